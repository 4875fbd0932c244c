// node-postgres (`pg`) through pgway with a pg.Pool of 4 connections (run by tests/drivers.rs).
//
// Queries with a `name` are named prepared statements: node-postgres sends Parse once per
// connection and name, then only Bind/Execute. Settings come from the environment:
// PGWAY_HOST, PGWAY_PORT, PGWAY_USER, PGWAY_PASSWORD, PGWAY_DB, PRIMARY_PORT, REPLICA_PORT,
// PREFIX. Exits 1 listing every failed check.
'use strict';

const assert = require('node:assert');
const { Pool } = require('pg');

const failures = [];

function eq(what, got, want) {
  try {
    assert.deepStrictEqual(got, want);
    console.log(`ok   ${what}: ${JSON.stringify(got)}`);
  } catch (_) {
    const msg = `${what}: expected ${JSON.stringify(want)}, got ${JSON.stringify(got)}`;
    console.log(`FAIL ${msg}`);
    failures.push(msg);
  }
}

function env(name) {
  const v = process.env[name];
  if (v === undefined) throw new Error(`environment variable ${name} is not set`);
  return v;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, fn, want, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let got;
  while (Date.now() < deadline) {
    got = await fn();
    if (got === want) return got;
    await sleep(100);
  }
  throw new Error(`${what}: still ${got} after ${timeoutMs} ms, expected ${want}`);
}

async function run() {
  const primary = Number(env('PRIMARY_PORT'));
  const replica = Number(env('REPLICA_PORT'));
  const t = `${env('PREFIX')}_items`;
  const schema = `${env('PREFIX')}_s`;
  const base = {
    host: process.env.PGWAY_HOST || '127.0.0.1',
    port: Number(env('PGWAY_PORT')),
    user: env('PGWAY_USER'),
    password: env('PGWAY_PASSWORD'),
    database: env('PGWAY_DB'),
    connectionTimeoutMillis: 10000,
    query_timeout: 60000,
  };
  const pool = new Pool({ ...base, max: 4, application_name: 'pgway-node' });
  const poolWithOptions = new Pool({
    ...base,
    max: 2,
    application_name: 'pgway-node-opts',
    options: `-c search_path=${schema},public`,
  });
  const port = (res) => res.rows[0].inet_server_port;
  try {
    // Plain reads, named and unnamed, from the pool's connections at once.
    let ports = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        i % 2 ? pool.query('select inet_server_port()') : pool.query({ name: 'port', text: 'select inet_server_port()' }),
      ),
    );
    eq('12 concurrent plain reads: servers', [...new Set(ports.map(port))], [replica]);

    await pool.query(`create table ${t} (id int primary key, v text not null, n bigint, f float8, ok bool)`);
    await pool.query(`create schema ${schema}`);
    await pool.query(`create table ${schema}.things (v text)`);
    await pool.query(`insert into ${schema}.things values ('in-schema')`);

    // Named prepared inserts, 40 at once over the pool.
    const insert = {
      name: 'insert-item',
      text: `insert into ${t} (id, v, n, f, ok) values ($1, $2, $3, $4, $5) returning inet_server_port()`,
    };
    ports = await Promise.all(
      Array.from({ length: 40 }, (_, i) => pool.query({ ...insert, values: [i, `v${i}`, String(i * 1e9), i / 4, i % 2 === 0] })),
    );
    eq('40 named prepared inserts: servers', [...new Set(ports.map(port))], [primary]);

    await waitFor('rows on the replica', async () => Number((await pool.query(`select count(*) from ${t}`)).rows[0].count), 40);
    const select = {
      name: 'select-item',
      text: `select v, n, f, ok, inet_server_port() from ${t} where id = $1`,
    };
    for (let round = 0; round < 3; round++) {
      const rows = await Promise.all(Array.from({ length: 40 }, (_, i) => pool.query({ ...select, values: [i] })));
      eq(
        `round ${round}: 40 named prepared selects`,
        rows.map((r) => [r.rows[0].v, r.rows[0].n, r.rows[0].f, r.rows[0].ok]),
        Array.from({ length: 40 }, (_, i) => [`v${i}`, String(i * 1e9), i / 4, i % 2 === 0]),
      );
      eq(`round ${round}: prepared selects: servers`, [...new Set(rows.map(port))], [replica]);
    }

    // A transaction on one client runs on the primary.
    {
      const c = await pool.connect();
      try {
        await c.query('begin');
        const r = await c.query({ name: 'count-items', text: `select count(*)::int as n, inet_server_port() from ${t}` });
        await c.query('commit');
        eq('transaction: (count, server)', [r.rows[0].n, port(r)], [40, primary]);
      } finally {
        c.release();
      }
    }

    // application_name from the StartupMessage, on a read and on a write.
    let r = await pool.query({ name: 'app', text: "select current_setting('application_name') as app, inet_server_port()" });
    eq('application_name on a read', [r.rows[0].app, port(r)], ['pgway-node', replica]);
    r = await pool.query(
      `insert into ${t} (id, v) values (1000, 'app') returning current_setting('application_name') as app, inet_server_port()`,
    );
    eq('application_name on a write', [r.rows[0].app, port(r)], ['pgway-node', primary]);

    // search_path from the StartupMessage (options=-c ...).
    await waitFor('the schema on the replica', async () => Number((await pool.query(`select count(*) from ${schema}.things`)).rows[0].count), 1);
    for (let i = 0; i < 5; i++) {
      await Promise.all([pool.query('select 1'), pool.query(`update ${t} set n = n where id = 1`)]);
      r = await poolWithOptions.query({
        name: 'things',
        text: "select v, current_setting('search_path') as path, current_setting('application_name') as app, inet_server_port() from things",
      });
      eq(`${i}: options search_path: read`, [r.rows[0].v, r.rows[0].path, r.rows[0].app, port(r)], [
        'in-schema',
        `${schema},public`, // as given in options: PostgreSQL shows it unchanged
        'pgway-node-opts',
        replica,
      ]);
      r = await poolWithOptions.query({ name: 'write-things', text: 'insert into things values ($1) returning v, inet_server_port()', values: [`o${i}`] });
      eq(`${i}: options search_path: write`, [r.rows[0].v, port(r)], [`o${i}`, primary]);
    }

    // SET on one checked-out client sticks to it; the other clients are not affected.
    {
      const c = await pool.connect();
      try {
        await c.query(`set search_path = ${schema}, public`);
        await c.query("set application_name = 'node-renamed'");
        for (let i = 0; i < 5; i++) {
          const others = await Promise.all(
            Array.from({ length: 3 }, () => pool.query({ name: 'path-app', text: "select current_setting('search_path') as path, current_setting('application_name') as app" })),
          );
          eq(`${i}: other clients' settings`, others.map((o) => [o.rows[0].path, o.rows[0].app]), Array(3).fill(['"$user", public', 'pgway-node']));
          r = await c.query({ name: 'things', text: "select v, current_setting('application_name') as app, inet_server_port() from things" });
          eq(`${i}: after SET: read`, [r.rows[0].v, r.rows[0].app, port(r)], ['in-schema', 'node-renamed', replica]);
          r = await c.query({ name: 'write-things', text: 'insert into things values ($1) returning v, inet_server_port()', values: [`s${i}`] });
          eq(`${i}: after SET: write`, [r.rows[0].v, port(r)], [`s${i}`, primary]);
        }
        await c.query('reset all');
      } finally {
        c.release();
      }
    }
  } finally {
    await pool.end();
    await poolWithOptions.end();
  }
}

(async () => {
  const timer = setTimeout(() => {
    console.log('FAIL node-postgres run: did not finish within 150 s');
    process.exit(1);
  }, 150000);
  try {
    await run();
  } catch (e) {
    console.log(e && e.stack ? e.stack : e);
    failures.push(`exception: ${e && e.message ? e.message : e}`);
  }
  clearTimeout(timer);
  if (failures.length) {
    console.log(`\nnode-postgres: ${failures.length} check(s) failed:`);
    for (const f of failures) console.log(`  - ${f}`);
    process.exit(1);
  }
  console.log('\nnode-postgres: all checks passed');
})();
