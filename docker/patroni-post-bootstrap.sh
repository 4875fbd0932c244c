#!/bin/sh
# Patroni's bootstrap.post_bootstrap: runs once, on the node that initialised the cluster, with
# a superuser connection URL as $1. Creates what scripts/patroni-cluster.sh creates after its
# bootstrap: the role `app` (password app-secret, SCRAM) and its database `app`.
set -eu
psql "$1" -X -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE app LOGIN PASSWORD 'app-secret';
SELECT 'CREATE DATABASE app OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'app') \gexec
SQL
