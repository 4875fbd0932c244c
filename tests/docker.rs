//! `docker/`, checked without a Docker engine (none runs on our machines): the compose file is
//! well formed (`docker compose config` where the plugin is; otherwise a YAML parse and the
//! checks `docker compose` would make: known keys, services that exist, declared volumes,
//! files that exist, no stray `$` interpolation) and has the production shape (a 3-member
//! etcd cluster, three Patroni nodes, two pgway instances, HAProxy and a one-DSN client);
//! `docker/pgway.toml` is a valid pgway config with config/patroni.toml's keys and values;
//! `docker/patroni.yml` carries scripts/patroni-cluster.sh's Patroni settings; HAProxy checks
//! Patroni's REST API as Patroni recommends and as benches/compare.sh times it; and the
//! Dockerfiles build, expose and run what the compose file expects.
//!
//! The native scripts stay the tested path: these tests keep the Docker files in step with them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde_norway::{Mapping, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docker_dir() -> PathBuf {
    repo().join("docker")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Parses YAML text and applies `<<` merge keys, as `docker compose` does.
fn parse_yaml(what: &str, text: &str) -> Value {
    let mut value: Value =
        serde_norway::from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{what}: bad merge key: {e}"));
    value
}

fn yaml_file(rel: &str) -> Value {
    parse_yaml(rel, &read(rel))
}

fn compose() -> Value {
    yaml_file("docker/compose.yaml")
}

fn patroni_yml() -> Value {
    yaml_file("docker/patroni.yml")
}

/// The value at a dotted path (`bootstrap.dcs.ttl`); panics naming the path when it is absent.
fn at<'a>(what: &str, value: &'a Value, path: &str) -> &'a Value {
    try_at(value, path).unwrap_or_else(|| panic!("{what}: no `{path}`"))
}

fn try_at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

/// A scalar as text: strings as they are, numbers and booleans as YAML writes them.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn mapping<'a>(what: &str, value: &'a Value) -> &'a Mapping {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("{what}: expected a mapping, found {value:?}"))
}

/// A list of scalars (`command`, `ports`, `expose`, `volumes`), or a string split on spaces.
fn strings(what: &str, value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|item| match item {
                Value::Mapping(_) => panic!("{what}: long syntax is not used here: {item:?}"),
                other => scalar(other),
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        other => panic!("{what}: expected a list, found {other:?}"),
    }
}

/// A service's `environment`, as a map or as a list of `KEY=value`.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    scalar(k),
                    if v.is_null() {
                        String::new()
                    } else {
                        scalar(v)
                    },
                )
            })
            .collect(),
        Some(list) => strings("environment", list)
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    }
}

fn services(compose: &Value) -> BTreeMap<String, &Value> {
    mapping(
        "compose.yaml services",
        at("compose.yaml", compose, "services"),
    )
    .iter()
    .map(|(k, v)| (scalar(k), v))
    .collect()
}

/// Services named `<prefix><digits>` (etcd1, patroni2, pgway1, ...).
fn numbered<'a>(compose: &'a Value, prefix: &str) -> BTreeMap<String, &'a Value> {
    let re = Regex::new(&format!("^{prefix}[0-9]+$")).unwrap();
    services(compose)
        .into_iter()
        .filter(|(name, _)| re.is_match(name))
        .collect()
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"))
}

/// `--flag=value` arguments of a command list.
fn flags(what: &str, command: &[String]) -> BTreeMap<String, String> {
    command
        .iter()
        .filter_map(|arg| arg.strip_prefix("--"))
        .map(|arg| {
            let (k, v) = arg
                .split_once('=')
                .unwrap_or_else(|| panic!("{what}: write `--{arg}` as --flag=value"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// `host:port` from a URL such as `http://etcd1:2379`.
fn host_port(url: &str) -> String {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/')
        .to_owned()
}

/// The port of a `host:port` listen address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not host:port"))
}

/// Each etcd service's flags (`--name`, `--initial-cluster`, ...).
fn etcd_flags(compose: &Value) -> BTreeMap<String, BTreeMap<String, String>> {
    numbered(compose, "etcd")
        .into_iter()
        .map(|(name, svc)| {
            let what = format!("service {name}");
            let command = strings(&what, at(&what, svc, "command"));
            let flags = flags(&what, &command);
            (name, flags)
        })
        .collect()
}

/// The client endpoints (`host:port`) the etcd services advertise.
fn etcd_client_endpoints(compose: &Value) -> BTreeSet<String> {
    etcd_flags(compose)
        .iter()
        .flat_map(|(name, f)| {
            let urls = f
                .get("advertise-client-urls")
                .unwrap_or_else(|| panic!("service {name}: no --advertise-client-urls"));
            urls.split(',').map(host_port).collect::<Vec<_>>()
        })
        .collect()
}

/// Published or exposed container ports of a service.
fn container_ports(name: &str, svc: &Value) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    if let Some(list) = svc.get("ports") {
        for p in strings(&format!("service {name} ports"), list) {
            // [ip:]host:container[/proto], or just container
            let container = p.split('/').next().unwrap_or(&p);
            let container = container.rsplit(':').next().unwrap_or(container);
            ports.insert(
                container
                    .parse()
                    .unwrap_or_else(|_| panic!("service {name}: bad port {p:?}")),
            );
        }
    }
    if let Some(list) = svc.get("expose") {
        for p in strings(&format!("service {name} expose"), list) {
            ports.insert(
                p.split('/')
                    .next()
                    .unwrap_or(&p)
                    .parse()
                    .unwrap_or_else(|_| panic!("service {name}: bad expose {p:?}")),
            );
        }
    }
    ports
}

/// Bind mounts of a service: container path -> host path (relative to docker/).
fn bind_mounts(name: &str, svc: &Value) -> BTreeMap<String, String> {
    let Some(list) = svc.get("volumes") else {
        return BTreeMap::new();
    };
    strings(&format!("service {name} volumes"), list)
        .into_iter()
        .filter(|v| v.starts_with('.') || v.starts_with('/'))
        .map(|v| {
            let mut parts = v.split(':');
            let host = parts.next().unwrap_or_default().to_owned();
            let container = parts
                .next()
                .unwrap_or_else(|| panic!("service {name}: volume {v:?} has no target"))
                .to_owned();
            (container, host)
        })
        .collect()
}

/// The `VAR=` default in a shell script: `VAR=${ENV:-default}` gives `default`, `VAR=word` (or
/// `local VAR=word`) gives `word`; anything computed gives None.
fn shell_default(script: &str, var: &str) -> Option<String> {
    let re = Regex::new(&format!(r"(?m)^\s*(?:local\s+)?{var}=(\S+)")).unwrap();
    let value = re.captures(script)?.get(1)?.as_str();
    let with_default = Regex::new(r"^\$\{\w+:-([^}]*)\}$").unwrap();
    if let Some(c) = with_default.captures(value) {
        return Some(c[1].to_owned());
    }
    if value.contains('$') || value.contains('(') || value.contains('`') {
        return None;
    }
    Some(value.to_owned())
}

/// The Patroni YAML scripts/patroni-cluster.sh writes (its `write_patroni_yaml` here-document),
/// with its variables at their defaults (computed ones, such as paths and the node's name,
/// become `<var>`).
fn native_patroni_yaml() -> Value {
    let script = read("scripts/patroni-cluster.sh");
    let re = Regex::new(r#"(?s)tee "\$DIR/\$name\.yml" >/dev/null <<EOF\n(.*?)\nEOF\n"#).unwrap();
    let body = re
        .captures(&script)
        .expect("scripts/patroni-cluster.sh: the Patroni YAML here-document (tee \"$DIR/$name.yml\" <<EOF) is gone")[1]
        .to_owned();
    let var = Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?").unwrap();
    let resolved = var.replace_all(&body, |c: &regex::Captures<'_>| {
        shell_default(&script, &c[1]).unwrap_or_else(|| format!("<{}>", &c[1]))
    });
    parse_yaml("the Patroni YAML of scripts/patroni-cluster.sh", &resolved)
}

/// One `key: value` line of scripts/patroni-cluster.sh's Patroni YAML, read with a regex.
fn native_setting(script: &str, key: &str) -> String {
    let re = Regex::new(&format!(r"(?m)^\s+{key}:\s*(\S+)\s*$")).unwrap();
    let values: Vec<&str> = re
        .captures_iter(script)
        .map(|c| c.get(1).unwrap().as_str())
        .collect();
    assert_eq!(
        values.len(),
        1,
        "scripts/patroni-cluster.sh should set `{key}:` exactly once, found {values:?}"
    );
    values[0].trim_matches('"').to_owned()
}

/// A Dockerfile's instructions, continuation lines joined and comments dropped.
fn dockerfile(rel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read(rel).lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn instructions<'a>(lines: &'a [String], keyword: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| {
            let (k, rest) = l.split_once(char::is_whitespace)?;
            k.eq_ignore_ascii_case(keyword).then_some(rest.trim())
        })
        .collect()
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------------------------
// (1) The compose file is valid
// ---------------------------------------------------------------------------------------------

#[test]
fn docker_compose_config_accepts_the_compose_file() {
    if !command_works("docker", &["compose", "version"]) {
        eprintln!(
            "skipped: `docker compose` is not available here; \
             compose_file_is_well_formed checks the file without it"
        );
        return;
    }
    let out = Command::new("docker")
        .args(["compose", "-f"])
        .arg(docker_dir().join("compose.yaml"))
        .args(["config", "-q"])
        .output()
        .expect("running docker compose config");
    assert!(
        out.status.success(),
        "docker compose config rejected docker/compose.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `docker compose config` would refuse (or what would fail at `up`), checked without it.
#[test]
fn compose_file_is_well_formed() {
    let compose = compose();
    let top = mapping("compose.yaml", &compose);
    const TOP_KEYS: &[&str] = &[
        "name", "services", "volumes", "networks", "configs", "secrets", "include",
    ];
    for key in top.keys().map(scalar) {
        assert!(
            TOP_KEYS.contains(&key.as_str()) || key.starts_with("x-"),
            "compose.yaml: unknown top-level key `{key}`"
        );
    }

    // Keys of the Compose Specification's service definition.
    const SERVICE_KEYS: &[&str] = &[
        "annotations",
        "attach",
        "build",
        "blkio_config",
        "cap_add",
        "cap_drop",
        "cgroup",
        "cgroup_parent",
        "command",
        "configs",
        "container_name",
        "cpu_count",
        "cpu_percent",
        "cpu_period",
        "cpu_quota",
        "cpu_rt_period",
        "cpu_rt_runtime",
        "cpu_shares",
        "cpus",
        "cpuset",
        "depends_on",
        "deploy",
        "develop",
        "device_cgroup_rules",
        "devices",
        "dns",
        "dns_opt",
        "dns_search",
        "domainname",
        "entrypoint",
        "env_file",
        "environment",
        "expose",
        "extends",
        "external_links",
        "extra_hosts",
        "group_add",
        "healthcheck",
        "hostname",
        "image",
        "init",
        "ipc",
        "isolation",
        "labels",
        "links",
        "logging",
        "mac_address",
        "mem_limit",
        "mem_reservation",
        "mem_swappiness",
        "memswap_limit",
        "network_mode",
        "networks",
        "oom_kill_disable",
        "oom_score_adj",
        "pid",
        "pids_limit",
        "platform",
        "ports",
        "privileged",
        "profiles",
        "pull_policy",
        "read_only",
        "restart",
        "runtime",
        "scale",
        "secrets",
        "security_opt",
        "shm_size",
        "stdin_open",
        "stop_grace_period",
        "stop_signal",
        "storage_opt",
        "sysctls",
        "tmpfs",
        "tty",
        "ulimits",
        "user",
        "userns_mode",
        "uts",
        "volumes",
        "volumes_from",
        "working_dir",
    ];
    const HEALTHCHECK_KEYS: &[&str] = &[
        "test",
        "interval",
        "timeout",
        "retries",
        "start_period",
        "start_interval",
        "disable",
    ];
    const CONDITIONS: &[&str] = &[
        "service_started",
        "service_healthy",
        "service_completed_successfully",
    ];
    const RESTART: &[&str] = &["no", "always", "on-failure", "unless-stopped"];

    let all = services(&compose);
    assert!(!all.is_empty(), "compose.yaml has no services");
    let declared_volumes: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().map(scalar).collect())
        .unwrap_or_default();
    let mut used_volumes = BTreeSet::new();

    for (name, svc) in &all {
        let what = format!("service {name}");
        let m = mapping(&what, svc);
        for key in m.keys().map(scalar) {
            assert!(
                SERVICE_KEYS.contains(&key.as_str()) || key.starts_with("x-"),
                "{what}: unknown key `{key}`"
            );
        }
        assert!(
            svc.get("image").is_some() || svc.get("build").is_some(),
            "{what}: neither image nor build"
        );
        if let Some(restart) = svc.get("restart") {
            let restart = scalar(restart);
            assert!(
                RESTART.contains(&restart.as_str()) || restart.starts_with("on-failure:"),
                "{what}: bad restart policy {restart:?}"
            );
        }
        if let Some(hc) = svc.get("healthcheck") {
            for key in mapping(&what, hc).keys().map(scalar) {
                assert!(
                    HEALTHCHECK_KEYS.contains(&key.as_str()),
                    "{what}: unknown healthcheck key `{key}`"
                );
            }
            let test = strings(&what, at(&what, hc, "test"));
            assert!(
                matches!(
                    test.first().map(String::as_str),
                    Some("CMD" | "CMD-SHELL" | "NONE")
                ),
                "{what}: a healthcheck test list starts with CMD or CMD-SHELL: {test:?}"
            );
        }
        // depends_on: services that exist; a health condition needs a healthcheck there.
        match svc.get("depends_on") {
            None => {}
            Some(Value::Sequence(_)) => {
                for dep in strings(&what, at(&what, svc, "depends_on")) {
                    assert!(all.contains_key(&dep), "{what}: depends on unknown {dep}");
                }
            }
            Some(Value::Mapping(deps)) => {
                for (dep, spec) in deps {
                    let dep = scalar(dep);
                    let target = all
                        .get(&dep)
                        .unwrap_or_else(|| panic!("{what}: depends on unknown {dep}"));
                    let condition = spec
                        .get("condition")
                        .map_or("service_started".to_owned(), scalar);
                    assert!(
                        CONDITIONS.contains(&condition.as_str()),
                        "{what}: bad condition {condition:?} on {dep}"
                    );
                    if condition == "service_healthy" {
                        assert!(
                            target.get("healthcheck").is_some(),
                            "{what} waits for {dep} to be healthy, but {dep} has no healthcheck"
                        );
                    }
                }
            }
            Some(other) => panic!("{what}: bad depends_on {other:?}"),
        }
        // Volumes: bind-mounted files exist; named volumes are declared.
        if let Some(list) = svc.get("volumes") {
            for v in strings(&what, list) {
                let source = v.split(':').next().unwrap_or_default();
                assert!(v.contains(':'), "{what}: volume {v:?} has no target");
                if source.starts_with('.') {
                    assert!(
                        docker_dir().join(source).exists(),
                        "{what}: bind-mounted {source} does not exist (relative to docker/)"
                    );
                } else if !source.starts_with('/') {
                    used_volumes.insert(source.to_owned());
                }
            }
        }
        // Builds: the context and the Dockerfile exist.
        if let Some(build) = svc.get("build") {
            let (context, file) = match build {
                Value::String(c) => (c.clone(), "Dockerfile".to_owned()),
                other => (
                    scalar(at(&what, other, "context")),
                    other
                        .get("dockerfile")
                        .map_or("Dockerfile".to_owned(), scalar),
                ),
            };
            let context = docker_dir().join(context);
            assert!(
                context.is_dir(),
                "{what}: build context {context:?} is missing"
            );
            assert!(
                context.join(&file).is_file(),
                "{what}: {file} is missing in the build context {context:?}"
            );
        }
    }
    for v in &used_volumes {
        assert!(
            declared_volumes.contains(v),
            "named volume `{v}` is used but not declared under top-level volumes"
        );
    }

    // Compose interpolates $VAR and ${VAR}: every dollar sign meant for a shell is written $$.
    let text = read("docker/compose.yaml");
    let stray = Regex::new(r"\$\$|\$").unwrap();
    for (n, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        if code.trim_start().starts_with('#') {
            continue;
        }
        for m in stray.find_iter(code) {
            assert_eq!(
                m.as_str(),
                "$$",
                "compose.yaml line {}: a lone `$` would be interpolated by compose: {line}",
                n + 1
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (2) The production shape
// ---------------------------------------------------------------------------------------------

#[test]
fn three_etcd_members_form_one_cluster() {
    let compose = compose();
    let etcd = etcd_flags(&compose);
    let names: BTreeSet<String> = etcd.keys().cloned().collect();
    assert_eq!(names.len(), 3, "expected etcd1..etcd3, found {names:?}");

    let mut clusters = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for (name, f) in &etcd {
        let svc = service(&compose, name);
        let image = scalar(at(name, svc, "image"));
        assert!(
            image.starts_with("quay.io/coreos/etcd:v3.5"),
            "{name}: image {image} is not etcd v3.5"
        );
        assert_eq!(
            f.get("name"),
            Some(name),
            "{name}: --name must be the service name"
        );
        let initial = f
            .get("initial-cluster")
            .unwrap_or_else(|| panic!("{name}: no --initial-cluster"));
        let members: BTreeMap<String, String> = initial
            .split(',')
            .map(|m| {
                let (n, url) = m
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: bad --initial-cluster entry {m:?}"));
                (n.to_owned(), url.to_owned())
            })
            .collect();
        assert_eq!(
            members.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "{name}: --initial-cluster must name every etcd member"
        );
        for (member, url) in &members {
            let advertised = etcd[member]
                .get("initial-advertise-peer-urls")
                .unwrap_or_else(|| panic!("{member}: no --initial-advertise-peer-urls"));
            assert_eq!(
                url, advertised,
                "{name}: --initial-cluster gives {member} a peer URL it does not advertise"
            );
            assert_eq!(
                host_port(url),
                format!("{member}:2380"),
                "{name}: {member}'s peer URL"
            );
        }
        assert_eq!(
            f.get("initial-cluster-state").map(String::as_str),
            Some("new"),
            "{name}: --initial-cluster-state"
        );
        let client = f
            .get("advertise-client-urls")
            .unwrap_or_else(|| panic!("{name}: no --advertise-client-urls"));
        assert_eq!(
            host_port(client),
            format!("{name}:2379"),
            "{name}: client URL"
        );
        clusters.insert(members);
        tokens.insert(f.get("initial-cluster-token").cloned());
    }
    assert_eq!(
        clusters.len(),
        1,
        "the etcd members disagree on --initial-cluster"
    );
    assert_eq!(
        tokens.len(),
        1,
        "the etcd members disagree on --initial-cluster-token"
    );
}

#[test]
fn three_patroni_nodes_use_etcd3_and_one_config() {
    let compose = compose();
    let patroni = numbered(&compose, "patroni");
    assert_eq!(
        patroni.len(),
        3,
        "expected patroni1..patroni3, found {:?}",
        patroni.keys()
    );
    let yml = patroni_yml();
    let api_port = port_of(&scalar(at("patroni.yml", &yml, "restapi.listen")));
    let pg_port = port_of(&scalar(at("patroni.yml", &yml, "postgresql.listen")));
    let config_path = {
        let lines = dockerfile("docker/Dockerfile.patroni");
        let cmd = instructions(&lines, "CMD");
        let cmd = cmd.last().expect("Dockerfile.patroni: no CMD").to_string();
        Regex::new(r#""(/[^"]+\.ya?ml)""#)
            .unwrap()
            .captures(&cmd)
            .unwrap_or_else(|| panic!("Dockerfile.patroni: CMD names no YAML file: {cmd}"))[1]
            .to_owned()
    };
    for (name, svc) in &patroni {
        let build = at(name, svc, "build");
        assert_eq!(
            scalar(at(name, build, "dockerfile")),
            "Dockerfile.patroni",
            "{name}: built from docker/Dockerfile.patroni"
        );
        let env = environment(svc);
        let expect = [
            ("PATRONI_NAME", name.clone()),
            (
                "PATRONI_RESTAPI_CONNECT_ADDRESS",
                format!("{name}:{api_port}"),
            ),
            (
                "PATRONI_POSTGRESQL_CONNECT_ADDRESS",
                format!("{name}:{pg_port}"),
            ),
        ];
        for (key, value) in expect {
            assert_eq!(env.get(key), Some(&value), "{name}: environment {key}");
        }
        let mounts = bind_mounts(name, svc);
        assert_eq!(
            mounts.get(&config_path).map(String::as_str),
            Some("./patroni.yml"),
            "{name}: docker/patroni.yml must be mounted at {config_path} (Dockerfile.patroni's CMD)"
        );
        assert!(
            strings(name, at(name, svc, "volumes"))
                .iter()
                .any(|v| v.ends_with(":/var/lib/postgresql/data")),
            "{name}: no data volume at /var/lib/postgresql/data"
        );
    }

    // Patroni speaks etcd's v3 API, to every member.
    assert!(
        yml.get("etcd").is_none(),
        "patroni.yml has an `etcd:` section (the v2 API): use `etcd3:`"
    );
    let hosts: BTreeSet<String> = match at("patroni.yml", &yml, "etcd3.hosts") {
        Value::String(s) => s.split(',').map(|h| h.trim().to_owned()).collect(),
        other => strings("etcd3.hosts", other).into_iter().collect(),
    };
    assert_eq!(
        hosts,
        etcd_client_endpoints(&compose),
        "patroni.yml etcd3.hosts must list every etcd member's client endpoint"
    );
}

#[test]
fn two_pgway_instances_behind_one_name() {
    let compose = compose();
    let pgway = numbered(&compose, "pgway");
    assert_eq!(
        pgway.len(),
        2,
        "expected pgway1 and pgway2, found {:?}",
        pgway.keys()
    );
    let config = pgway_config();
    let (port, admin_port) = (config.listen.port(), config.admin_listen.port());
    assert_eq!(port, 6432, "docker/pgway.toml listen port");
    for (name, svc) in &pgway {
        let build = at(name, svc, "build");
        assert_eq!(
            scalar(at(name, build, "context")),
            "..",
            "{name}: build context"
        );
        assert_eq!(
            scalar(at(name, build, "dockerfile")),
            "docker/Dockerfile",
            "{name}: built from docker/Dockerfile"
        );
        let ports = container_ports(name, svc);
        assert!(
            ports.contains(&port),
            "{name}: does not expose {port}: {ports:?}"
        );
        assert!(
            ports.contains(&admin_port),
            "{name}: does not expose the admin port {admin_port}: {ports:?}"
        );
        assert_eq!(
            bind_mounts(name, svc)
                .get("/etc/pgway/pgway.toml")
                .map(String::as_str),
            Some("./pgway.toml"),
            "{name}: docker/pgway.toml must be mounted at /etc/pgway/pgway.toml"
        );
        let command = strings(name, at(name, svc, "command"));
        assert_eq!(
            command,
            ["--config", "/etc/pgway/pgway.toml"],
            "{name}: command"
        );
        let aliases = strings(name, at(name, svc, "networks.default.aliases"));
        assert!(
            aliases.iter().any(|a| a == "pgway"),
            "{name}: needs the network alias `pgway`, has {aliases:?}"
        );
        let test = strings(name, at(name, svc, "healthcheck.test")).join(" ");
        assert!(
            test.contains(&format!(":{admin_port}/health")),
            "{name}: the healthcheck should GET /health on {admin_port}: {test}"
        );
    }
}

#[test]
fn haproxy_and_a_one_dsn_client() {
    let compose = compose();
    let haproxy = service(&compose, "haproxy");
    let image = scalar(at("haproxy", haproxy, "image"));
    assert!(image.starts_with("haproxy:2.6"), "haproxy image {image}");
    assert_eq!(
        bind_mounts("haproxy", haproxy)
            .get("/usr/local/etc/haproxy/haproxy.cfg")
            .map(String::as_str),
        Some("./haproxy.cfg"),
        "haproxy: docker/haproxy.cfg must be mounted where the image reads its config"
    );
    let ports = container_ports("haproxy", haproxy);
    for p in [5432, 5433] {
        assert!(
            ports.contains(&p),
            "haproxy: port {p} not published: {ports:?}"
        );
    }

    // The example client connects with one DSN to the name both pgway instances answer to.
    let app = service(&compose, "app");
    let dsn =
        Regex::new(r"postgres(?:ql)?://([A-Za-z0-9_]+):([^@\s]+)@([A-Za-z0-9_.-]+):(\d+)/(\w+)")
            .unwrap();
    let env = environment(app);
    let command = app
        .get("command")
        .map(|c| strings("app", c).join(" "))
        .unwrap_or_default();
    let found: Vec<[String; 4]> = env
        .values()
        .chain(std::iter::once(&command))
        .flat_map(|text| {
            dsn.captures_iter(text)
                .map(|c| [1, 2, 3, 4].map(|i| c[i].to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!found.is_empty(), "app: no postgresql:// DSN");
    let users = pgway_users();
    for [user, password, host, port] in &found {
        assert_eq!(
            (host.as_str(), port.as_str()),
            ("pgway", "6432"),
            "app: connect to pgway:6432"
        );
        assert_eq!(
            users.get(user),
            Some(password),
            "app: {user}:{password} is not a user of docker/pgway.toml"
        );
    }
    let deps = mapping("app depends_on", at("app", app, "depends_on"));
    for name in numbered(&compose, "pgway").keys() {
        assert!(
            deps.contains_key(name.as_str()),
            "app should wait for {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (3) docker/pgway.toml
// ---------------------------------------------------------------------------------------------

fn pgway_config() -> pgway::config::Config {
    pgway::config::Config::from_toml_str(&read("docker/pgway.toml"))
        .unwrap_or_else(|e| panic!("docker/pgway.toml rejected: {e}"))
}

/// Every leaf of a TOML document by its dotted path (`users[0].name`, `topology.etcd`).
fn toml_leaves(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                toml_leaves(&path, v, out);
            }
        }
        toml::Value::Array(items)
            if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
        {
            for (i, v) in items.iter().enumerate() {
                toml_leaves(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

fn toml_file_leaves(rel: &str) -> BTreeMap<String, toml::Value> {
    let value: toml::Value =
        toml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not TOML: {e}"));
    let mut out = BTreeMap::new();
    toml_leaves("", &value, &mut out);
    out
}

/// `[[users]]` of docker/pgway.toml: name -> password.
fn pgway_users() -> BTreeMap<String, String> {
    let leaves = toml_file_leaves("docker/pgway.toml");
    let name = Regex::new(r"^users\[(\d+)\]\.name$").unwrap();
    leaves
        .iter()
        .filter_map(|(key, value)| {
            let i = &name.captures(key)?[1];
            let password = leaves.get(&format!("users[{i}].password"))?;
            Some((value.as_str()?.to_owned(), password.as_str()?.to_owned()))
        })
        .collect()
}

#[test]
fn pgway_toml_follows_the_three_etcd_members() {
    let config = pgway_config();
    let pgway::config::TopologyConfig::Patroni(topology) = &config.topology else {
        panic!("docker/pgway.toml: [topology] kind must be \"patroni\"");
    };
    let endpoints: BTreeSet<String> = topology.etcd.iter().map(|e| host_port(e)).collect();
    assert_eq!(
        topology.etcd.len(),
        endpoints.len(),
        "docker/pgway.toml: an etcd endpoint is listed twice"
    );
    let compose = compose();
    let members = etcd_client_endpoints(&compose);
    assert_eq!(
        members.len(),
        3,
        "three etcd client endpoints expected: {members:?}"
    );
    assert_eq!(
        endpoints, members,
        "docker/pgway.toml topology.etcd must name every etcd member"
    );

    let yml = patroni_yml();
    assert_eq!(
        topology.scope,
        scalar(at("patroni.yml", &yml, "scope")),
        "pgway's scope is Patroni's"
    );
    assert_eq!(
        topology.namespace,
        scalar(at("patroni.yml", &yml, "namespace")),
        "pgway's namespace is Patroni's"
    );

    // In a container pgway must listen on every interface, or nothing outside reaches it.
    assert!(
        config.listen.ip().is_unspecified(),
        "listen {}",
        config.listen
    );
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "admin_listen {}",
        config.admin_listen
    );

    // The users pgway logs in as are the ones docker/patroni-post-bootstrap.sh creates.
    let bootstrap = read("docker/patroni-post-bootstrap.sh");
    let users = pgway_users();
    assert!(!users.is_empty(), "docker/pgway.toml has no [[users]]");
    for (name, password) in &users {
        let line = format!("ALTER ROLE {name} LOGIN PASSWORD '{password}'");
        assert!(
            bootstrap.contains(&line),
            "docker/patroni-post-bootstrap.sh does not create user {name} with pgway's password"
        );
    }

    // The binary the image runs accepts it too.
    let out = Command::new(env!("CARGO_BIN_EXE_pgway"))
        .args(["check", "--config"])
        .arg(docker_dir().join("pgway.toml"))
        .env_remove("PGWAY_CONFIG")
        .output()
        .expect("running pgway check");
    assert!(
        out.status.success(),
        "pgway check --config docker/pgway.toml failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pgway_toml_has_the_keys_and_values_of_config_patroni_toml() {
    let native = toml_file_leaves("config/patroni.toml");
    let docker = toml_file_leaves("docker/pgway.toml");
    assert_eq!(
        docker.keys().collect::<Vec<_>>(),
        native.keys().collect::<Vec<_>>(),
        "docker/pgway.toml and config/patroni.toml set different keys"
    );
    // Addresses differ in a container; everything else is the same.
    const ADDRESSES: &[&str] = &["listen", "admin_listen", "topology.etcd"];
    for (key, value) in &native {
        if ADDRESSES.contains(&key.as_str()) {
            continue;
        }
        assert_eq!(
            docker.get(key),
            Some(value),
            "docker/pgway.toml `{key}` differs from config/patroni.toml"
        );
    }
    for key in ADDRESSES {
        assert!(
            docker.contains_key(*key),
            "docker/pgway.toml sets no `{key}`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (4) Patroni settings in step with scripts/patroni-cluster.sh
// ---------------------------------------------------------------------------------------------

#[test]
fn patroni_settings_match_the_native_script() {
    let script = read("scripts/patroni-cluster.sh");
    let yml = patroni_yml();

    // The settings named one by one, read from the script with a regex.
    let named = [
        ("ttl", "bootstrap.dcs.ttl"),
        ("loop_wait", "bootstrap.dcs.loop_wait"),
        ("retry_timeout", "bootstrap.dcs.retry_timeout"),
        ("wal_level", "bootstrap.dcs.postgresql.parameters.wal_level"),
        (
            "max_wal_senders",
            "bootstrap.dcs.postgresql.parameters.max_wal_senders",
        ),
        (
            "max_replication_slots",
            "bootstrap.dcs.postgresql.parameters.max_replication_slots",
        ),
    ];
    for (key, path) in named {
        let native = native_setting(&script, key);
        let docker = scalar(at("docker/patroni.yml", &yml, path));
        assert_eq!(
            docker, native,
            "docker/patroni.yml {path} differs from scripts/patroni-cluster.sh"
        );
    }
    // pgway's result cache follows the primary's WAL by logical decoding.
    assert_eq!(
        scalar(at(
            "docker/patroni.yml",
            &yml,
            "bootstrap.dcs.postgresql.parameters.wal_level"
        )),
        "logical"
    );

    // And the whole of what must be the same, from the script's YAML itself.
    let native = native_patroni_yaml();
    for path in [
        "scope",
        "namespace",
        "bootstrap.dcs",
        "bootstrap.initdb",
        "postgresql.basebackup",
        "postgresql.authentication",
        "tags",
    ] {
        assert_eq!(
            at("docker/patroni.yml", &yml, path),
            at("scripts/patroni-cluster.sh", &native, path),
            "docker/patroni.yml `{path}` differs from scripts/patroni-cluster.sh"
        );
    }
    assert_eq!(
        at("scripts/patroni-cluster.sh", &native, "bootstrap.dcs.ttl"),
        &Value::from(10),
        "reading the script's YAML went wrong"
    );
    // Both speak etcd's v3 API.
    assert!(
        native.get("etcd3").is_some(),
        "the script has no etcd3: section"
    );
    assert!(
        yml.get("etcd3").is_some(),
        "docker/patroni.yml has no etcd3: section"
    );

    // The same PostgreSQL major version: the script's bin dir, the image's packages.
    let bin_dir = scalar(at("docker/patroni.yml", &yml, "postgresql.bin_dir"));
    assert_eq!(
        Some(bin_dir.clone()),
        shell_default(&script, "PG_BIN"),
        "postgresql.bin_dir"
    );
    let lines = dockerfile("docker/Dockerfile.patroni");
    let major = instructions(&lines, "ARG")
        .iter()
        .find_map(|a| a.strip_prefix("PG_MAJOR="))
        .expect("Dockerfile.patroni: no ARG PG_MAJOR=")
        .to_owned();
    assert_eq!(
        bin_dir,
        format!("/usr/lib/postgresql/{major}/bin"),
        "Dockerfile.patroni installs PostgreSQL {major}"
    );
}

/// Patroni's own validator, where Patroni is installed (scripts/install-deps.sh installs it).
#[test]
fn patroni_validates_its_docker_config() {
    if !command_works("patroni", &["--version"]) {
        eprintln!("skipped: patroni is not installed here");
        return;
    }
    let out = Command::new("patroni")
        .arg("--validate-config")
        .arg(docker_dir().join("patroni.yml"))
        .env("PATRONI_NAME", "patroni1")
        .env("PATRONI_RESTAPI_CONNECT_ADDRESS", "patroni1:8008")
        .env("PATRONI_POSTGRESQL_CONNECT_ADDRESS", "patroni1:5432")
        .output()
        .expect("running patroni --validate-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Outside the compose network the service names do not resolve; and Patroni 3.0's
    // validator wants two keys its own docs call optional (scripts/patroni-cluster.sh's YAML
    // gets the same two messages).
    let expected = Regex::new(
        r"(?x)^(
            etcd3\.hosts\.\d+\ etcd\d:\d+\ didn't\ pass\ validation:.*(Name|name|resolution|known).*
          | bootstrap\.pg_hba\s+is\ not\ defined\.
          | postgresql\.authentication\.rewind\s+is\ not\ defined\.
        )$",
    )
    .unwrap();
    let problems: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !expected.is_match(l))
        .collect();
    assert!(
        problems.is_empty(),
        "patroni --validate-config docker/patroni.yml:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// (5) HAProxy as Patroni recommends
// ---------------------------------------------------------------------------------------------

/// haproxy.cfg's sections: header line -> body lines (trimmed, comments dropped).
fn haproxy_sections(text: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or_default();
        if code.trim().is_empty() {
            continue;
        }
        let normal = code.split_whitespace().collect::<Vec<_>>().join(" ");
        if code.starts_with(char::is_whitespace) {
            let (_, body) = sections
                .last_mut()
                .expect("haproxy.cfg: an indented line before any section");
            body.push(normal);
        } else {
            sections.push((normal, Vec::new()));
        }
    }
    sections
}

#[test]
fn haproxy_checks_patronis_rest_api() {
    let text = read("docker/haproxy.cfg");
    let sections = haproxy_sections(&text);
    let compose = compose();
    let patroni: BTreeSet<String> = numbered(&compose, "patroni").keys().cloned().collect();
    assert_eq!(patroni.len(), 3);
    let yml = patroni_yml();
    let api_port = port_of(&scalar(at("patroni.yml", &yml, "restapi.listen")));
    let pg_port = port_of(&scalar(at("patroni.yml", &yml, "postgresql.listen")));

    // benches/compare.sh's check timing, which Patroni's docs recommend too.
    let bench = read("benches/compare.sh");
    let bench_timing = Regex::new(r"(?m)^\s*default-server\s+(.+?)\s*$")
        .unwrap()
        .captures(&bench)
        .expect("benches/compare.sh: no default-server line")[1]
        .to_owned();
    let recommended = "inter 3s fall 3 rise 2 on-marked-down shutdown-sessions";
    assert!(
        bench_timing.contains(recommended),
        "benches/compare.sh's default-server is {bench_timing:?}"
    );
    let defaults: Vec<String> = sections
        .iter()
        .filter(|(h, _)| h == "defaults")
        .flat_map(|(_, b)| b.clone())
        .collect();

    for (port, check) in [(5432, "GET /primary"), (5433, "GET /replica")] {
        let (header, body) = sections
            .iter()
            .find(|(_, body)| {
                body.iter().any(|l| {
                    l.starts_with("bind ")
                        && l.split_whitespace()
                            .nth(1)
                            .is_some_and(|a| a.ends_with(&format!(":{port}")))
                })
            })
            .unwrap_or_else(|| panic!("haproxy.cfg: no section binds :{port}"));
        assert!(
            header.starts_with("listen ") || header.starts_with("frontend "),
            "haproxy.cfg: :{port} is bound in {header:?}"
        );
        assert!(
            body.iter().any(|l| l == &format!("option httpchk {check}")),
            "haproxy.cfg {header}: needs `option httpchk {check}`"
        );
        assert!(
            body.iter().any(|l| l == "http-check expect status 200"),
            "haproxy.cfg {header}: needs `http-check expect status 200`"
        );
        let default_server = body
            .iter()
            .chain(defaults.iter())
            .find(|l| l.starts_with("default-server "))
            .unwrap_or_else(|| panic!("haproxy.cfg {header}: no default-server line"));
        assert!(
            default_server.contains(&bench_timing),
            "haproxy.cfg {header}: default-server should carry benches/compare.sh's \
             `{bench_timing}`, has `{default_server}`"
        );
        let servers: BTreeSet<String> = body
            .iter()
            .filter(|l| l.starts_with("server "))
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                assert!(
                    l.contains(&format!(" check port {api_port}")),
                    "haproxy.cfg {header}: `{l}` must check Patroni's REST API on {api_port}"
                );
                words.get(2).copied().unwrap_or_default().to_owned()
            })
            .collect();
        let expected: BTreeSet<String> = patroni.iter().map(|n| format!("{n}:{pg_port}")).collect();
        assert_eq!(
            servers, expected,
            "haproxy.cfg {header}: every Patroni node, at its PostgreSQL port"
        );
    }

    if command_works("haproxy", &["-v"]) {
        let out = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(docker_dir().join("haproxy.cfg"))
            .output()
            .expect("running haproxy -c");
        assert!(
            out.status.success(),
            "haproxy -c rejected docker/haproxy.cfg:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("skipped `haproxy -c`: haproxy is not installed here");
    }
}

// ---------------------------------------------------------------------------------------------
// The Dockerfiles
// ---------------------------------------------------------------------------------------------

#[test]
fn the_pgway_image_builds_in_two_stages_and_runs_unprivileged() {
    let lines = dockerfile("docker/Dockerfile");
    let froms = instructions(&lines, "FROM");
    assert!(
        froms.len() >= 2,
        "docker/Dockerfile: not multi-stage: {froms:?}"
    );
    let builder =
        Regex::new(r"^rust:(\$\{RUST_VERSION\}|1(\.\d+)*)-bookworm\s+AS\s+(\w+)$").unwrap();
    let build_stage = builder.captures(froms[0]).unwrap_or_else(|| {
        panic!(
            "docker/Dockerfile: first stage should be rust:1.9x-bookworm AS <name>: {}",
            froms[0]
        )
    })[3]
        .to_owned();
    let last = froms[froms.len() - 1];
    assert!(
        last.starts_with("debian:bookworm-slim"),
        "docker/Dockerfile: runtime stage is {last}"
    );
    let runs = instructions(&lines, "RUN").join("\n");
    assert!(
        runs.contains("cargo build --release --locked"),
        "docker/Dockerfile: no `cargo build --release --locked`"
    );
    assert!(
        runs.contains("ca-certificates"),
        "docker/Dockerfile: no ca-certificates"
    );
    assert!(
        instructions(&lines, "COPY")
            .iter()
            .any(|c| c.starts_with(&format!("--from={build_stage} "))),
        "docker/Dockerfile: the runtime copies nothing from the {build_stage} stage"
    );
    let user = instructions(&lines, "USER");
    let user = user.last().expect("docker/Dockerfile: no USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "docker/Dockerfile runs as {user}"
    );
    let exposed: BTreeSet<u16> = instructions(&lines, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.parse().expect("EXPOSE port"))
        .collect();
    let config = pgway_config();
    assert_eq!(
        exposed,
        BTreeSet::from([config.listen.port(), config.admin_listen.port()]),
        "docker/Dockerfile EXPOSE: the client and admin ports of docker/pgway.toml"
    );
    assert_eq!(instructions(&lines, "ENTRYPOINT"), [r#"["pgway"]"#]);
    assert_eq!(
        instructions(&lines, "CMD"),
        [r#"["--config", "/etc/pgway/pgway.toml"]"#]
    );
    let ignore = read("docker/Dockerfile.dockerignore");
    for entry in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            "docker/Dockerfile.dockerignore should leave out {entry}"
        );
    }
}

#[test]
fn the_patroni_image_has_postgresql_patroni_and_the_bootstrap_script() {
    let lines = dockerfile("docker/Dockerfile.patroni");
    let froms = instructions(&lines, "FROM");
    assert!(
        froms.iter().all(|f| f.starts_with("debian:bookworm")),
        "Dockerfile.patroni: Debian bookworm's packages, found {froms:?}"
    );
    let runs = instructions(&lines, "RUN").join("\n");
    for package in ["postgresql-${PG_MAJOR}", "patroni", "python3-etcd", "curl"] {
        assert!(
            runs.split_whitespace()
                .any(|w| w.trim_matches(['"', ';']) == package),
            "Dockerfile.patroni does not install {package}"
        );
    }
    assert!(
        runs.contains("create_main_cluster = false"),
        "Dockerfile.patroni: postgresql-common must not create a cluster of its own"
    );
    assert_eq!(
        instructions(&lines, "USER").last().copied(),
        Some("postgres"),
        "Dockerfile.patroni runs as postgres"
    );
    let yml = patroni_yml();
    let script = scalar(at("patroni.yml", &yml, "bootstrap.post_bootstrap"));
    assert!(
        instructions(&lines, "COPY")
            .iter()
            .any(|c| c.ends_with(&format!(" {script}"))),
        "Dockerfile.patroni does not install {script} (patroni.yml's bootstrap.post_bootstrap)"
    );
}
