//! The configuration's tests: files, the environment, errors, the key table.

use super::*;
use std::io::Write;

fn write(text: &str) -> tempfile::TempPath {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.into_temp_path()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn embedded_default_is_open_on_loopback() {
    let (cfg, warnings) = Config::load(None, &[]).unwrap();
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(cfg.server.data_dir, PathBuf::from("./hivegate-data"));
    assert_eq!(cfg.auth.mode, AuthMode::Open);
    assert!(cfg.auth.implicit_open());
    assert!(warnings.is_empty());
}

#[test]
fn state_directory_sets_the_data_dir() {
    let (cfg, _) = Config::load(None, &env(&[("STATE_DIRECTORY", "/var/lib/hg:/x")])).unwrap();
    assert_eq!(cfg.server.data_dir, PathBuf::from("/var/lib/hg"));
}

#[test]
fn environment_wins_over_the_file() {
    let p = write("[server]\nmax_connections = 50\nallowed_origins = [\"https://a\"]\n");
    let (cfg, _) = Config::load(
        Some(&p),
        &env(&[
            ("HIVEGATE_SERVER_MAX_CONNECTIONS", "70"),
            ("HIVEGATE_AUTH_TOKENS", "alice:tok1, bob:tok2"),
            ("HIVEGATE_KIMI_KEY", "secret"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.server.max_connections, 70);
    assert_eq!(cfg.server.allowed_origins, ["https://a"]);
    assert_eq!(cfg.auth.tokens.len(), 2);
    assert_eq!(cfg.auth.mode, AuthMode::Token);
}

#[test]
fn unknown_keys_bad_types_and_ranges_name_key_and_line() {
    let p = write(
        "[server]\nmax_conections = 5\nmax_connections = \"many\"\nhello_timeout_ms = 0\n[tls]\ncert = \"x\"\n",
    );
    let errs = Config::load(Some(&p), &[]).unwrap_err().0;
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 4, "{text:?}");
    assert!(
        text[0].contains(":2: unknown key server.max_conections"),
        "{}",
        text[0]
    );
    assert!(text[0].contains("server.max_connections"), "{}", text[0]);
    assert!(
        text[1].contains(":3: server.max_connections: expected an integer"),
        "{}",
        text[1]
    );
    assert!(
        text[2].contains(":4: server.hello_timeout_ms: 0 is out of range"),
        "{}",
        text[2]
    );
    assert!(text[3].contains(":6: unknown key tls.cert"), "{}", text[3]);
}

#[test]
fn limits_take_fractions_and_refuse_zero_refill() {
    let p = write("[limits]\nuser_refill_per_s = 0.5\nuser_capacity = 10\n");
    let (cfg, _) = Config::load(Some(&p), &env(&[("HIVEGATE_LIMITS_IP_CAPACITY", "7")])).unwrap();
    assert_eq!(
        cfg.limits.user,
        crate::limit::BucketParams {
            capacity: 10.0,
            refill_per_s: 0.5
        }
    );
    assert_eq!(cfg.limits.ip.capacity, 7.0);
    let p = write("[limits]\nglobal_refill_per_s = 0\n");
    let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(
        err.contains(":2: limits.global_refill_per_s: 0 is out of range"),
        "{err}"
    );
}

#[test]
fn env_errors_name_the_variable() {
    let errs = Config::load(None, &env(&[("HIVEGATE_SERVER_OUTBOX_FRAMES", "65")]))
        .unwrap_err()
        .0;
    assert_eq!(
        errs[0].origin,
        Origin::Env("HIVEGATE_SERVER_OUTBOX_FRAMES".into())
    );
    assert!(errs[0].message.contains("out of range"));
}

#[test]
fn no_tokens_on_a_public_address_refuses_to_start() {
    let p = write("[server]\nlisten = \"0.0.0.0:8080\"\n");
    let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(err.contains("auth.mode = \"open\""), "{err}");
    let p = write("[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"open\"\n");
    let (cfg, _) = Config::load(Some(&p), &[]).unwrap();
    assert_eq!(cfg.auth.mode, AuthMode::Open);
    assert!(!cfg.auth.implicit_open());
}

#[test]
fn token_errors_never_echo_the_secret() {
    let p = write("[auth]\ntokens = [\"al ice:hunter2secret\"]\n");
    let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(err.contains("entry 1"), "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");
}

#[test]
fn the_readme_documents_every_key_with_its_default() {
    let readme = include_str!("../../README.md");
    for key in keys() {
        let row = format!("| `{}` | ", key.name);
        let Some(at) = readme.find(&row) else {
            panic!("README lacks {}", key.name);
        };
        let cell = readme[at + row.len()..].split('|').next().unwrap_or("");
        if !key.default.is_empty() {
            assert!(
                cell.contains(&format!("`{}`", key.default)),
                "README shows {}'s default as {cell:?}, the key table as {}",
                key.name,
                key.default
            );
        }
    }
}

#[test]
fn the_full_fixture_sets_every_key() {
    let text = include_str!("../../fixtures/config/full.toml");
    let set: Vec<String> = toml::parse(text)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    for key in keys().map(|k| k.name) {
        let key = &key
            .replace("provider.NAME.", "provider.kimi.")
            .replace("access.N.", "access.1.");
        // The two key sources are alternatives: one of them is set.
        let key = &key.replace("api_key_env", "api_key_file");
        assert!(
            set.iter().any(|k| k == key),
            "fixtures/config/full.toml lacks {key}"
        );
    }
}

#[test]
fn providers_come_from_sections_and_the_environment_and_keys_stay_secret() {
    let keyfile = write("  sk-from-file-123\n");
    let p = write(&format!(
        "[llm]\nchain = [\"glm\", \"kimi\"]\n[provider.kimi]\nbase_url = \"https://api.moonshot.ai/v1/\"\nmodel = \"m1\"\napi_key_env = \"KIMI_KEY\"\n[provider.glm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"g\"\napi_key_file = {:?}\n",
        keyfile.to_str().unwrap()
    ));
    let env = env(&[
        ("KIMI_KEY", "sk-secret-kimi"),
        (
            "HIVEGATE_PROVIDER_MY_LOCAL_BASE_URL",
            "http://127.0.0.1:8/v1",
        ),
        ("HIVEGATE_PROVIDER_MY_LOCAL_MODEL", "llama"),
        ("HIVEGATE_PROVIDER_KIMI_FAIL_MAX", "7"),
    ]);
    let (cfg, _) = Config::load(Some(&p), &env).unwrap();
    let names: Vec<&str> = cfg.llm.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["kimi", "glm", "my_local"]);
    assert_eq!(cfg.llm.chain, ["glm", "kimi"]);
    let kimi = &cfg.llm.providers[0];
    assert_eq!(kimi.base_url, "https://api.moonshot.ai/v1");
    assert_eq!(kimi.fail_max, 7);
    assert_eq!(kimi.api_key.as_ref().unwrap().expose(), "sk-secret-kimi");
    assert_eq!(
        cfg.llm.providers[1].api_key.as_ref().unwrap().expose(),
        "sk-from-file-123"
    );
    assert!(cfg.llm.providers[2].api_key.is_none());
    assert!(!format!("{cfg:?}").contains("sk-secret-kimi"));
    // A missing key names the variable, never a value.
    let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(err.contains("KIMI_KEY"), "{err}");
    let p = write("[llm]\nchain = [\"nope\"]\n");
    assert!(Config::load(Some(&p), &[])
        .unwrap_err()
        .to_string()
        .contains("nope"));
    let p = write("[provider.x]\nbase_url = \"ftp://x\"\n");
    assert!(Config::load(Some(&p), &[]).is_err());
    let p = write("[provider.x]\nbase_uri = \"http://x\"\n");
    assert!(Config::load(Some(&p), &[])
        .unwrap_err()
        .to_string()
        .contains("base_url"));
}

#[test]
fn every_key_maps_to_an_env_variable_and_back() {
    for key in keys()
        .map(|k| k.name)
        // Provider keys are checked below; `[[access]]` rules are the
        // file's alone.
        .filter(|k| !k.starts_with("provider.") && !k.starts_with("access."))
    {
        let var = env_name(key);
        assert_eq!(key_for_env(&var["HIVEGATE_".len()..]).as_deref(), Some(key));
    }
    assert_eq!(
        key_for_env("PROVIDER_KIMI_API_KEY_ENV").as_deref(),
        Some("provider.kimi.api_key_env")
    );
    assert_eq!(env_name("server.listen"), "HIVEGATE_SERVER_LISTEN");
}

#[test]
fn every_default_reads_and_the_embedded_default_is_what_the_table_says() {
    for key in keys().filter(|k| !k.default.is_empty()) {
        let entries = toml::parse(&format!("x = {}", key.default)).unwrap();
        let setting = Setting {
            key: key.name,
            value: &entries[0].value,
            from_env: false,
            env: &[],
        };
        let applied = match &key.set {
            Set::C(f) => f(&mut Config::default(), &setting),
            Set::R(f) => f(&mut RemoteConfig::default(), &setting),
            Set::P(f) => f(&mut ProviderConfig::default(), &setting),
            Set::K(f) => f(&mut crate::cluster::ClusterConfig::default(), &setting),
            Set::A(f) => f(&mut crate::access::Rule::default(), &setting),
        };
        assert_eq!(applied, Ok(()), "{}", key.name);
    }
    let cfg = Config::default_with_env(&[]);
    assert_eq!(cfg.server.max_connections, 1000);
    assert_eq!(cfg.server.outbox_bytes, 1 << 20);
    assert_eq!(
        cfg.store.retention,
        std::time::Duration::from_secs(30 * 86_400)
    );
    assert_eq!(cfg.limits.ip_connect.refill_per_s, 2.0);
    assert_eq!(cfg.limits.abuse_threshold, 50);
    assert_eq!(cfg.log.level, crate::ops::log::LogLevel::Info);
    assert!(cfg.remote.is_none() && cfg.llm.providers.is_empty());
    let (cfg, _) = Config::from_text(
        Some((
            Path::new("t.toml"),
            "[remote]\nurl = \"http://x\"\n[provider.k]\nbase_url = \"http://y\"\nmodel = \"m\"\n",
        )),
        &[],
    )
    .unwrap();
    let remote = cfg.remote.unwrap();
    assert_eq!((remote.batch_rows, remote.fail_max), (500, 3));
    assert_eq!(remote.messages_table, "messages");
    let p = &cfg.llm.providers[0];
    assert_eq!((p.max_in_flight, p.fail_max, p.rpm), (4, 4, 0));
    assert_eq!(p.total_timeout, std::time::Duration::from_secs(300));
}

#[test]
fn systemd_directories_expand_in_paths() {
    let p = write(
        "[server]\ndata_dir = \"$STATE_DIRECTORY/db\"\n[provider.k]\nbase_url = \"http://x\"\nmodel = \"m\"\napi_key_file = \"${CREDENTIALS_DIRECTORY}/kimi.key\"\n",
    );
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("kimi.key"), "sk-cred\n").unwrap();
    let key = creds.path().join("kimi.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let e = env(&[
        ("STATE_DIRECTORY", "/var/lib/hivegate:/other"),
        ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
    ]);
    let (cfg, _) = Config::load(Some(&p), &e).unwrap();
    assert_eq!(cfg.server.data_dir, PathBuf::from("/var/lib/hivegate/db"));
    assert_eq!(
        cfg.llm.providers[0].api_key.as_ref().unwrap().expose(),
        "sk-cred"
    );
    let err = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(err.contains("$STATE_DIRECTORY, which is not set"), "{err}");
}

#[test]
fn a_misspelt_key_gets_the_nearest() {
    let p = write("[server]\nmax_conections = 5\n[store]\nretention_mz = 3\n");
    let text = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(
        text.contains("did you mean server.max_connections?"),
        "{text}"
    );
    assert!(text.contains("did you mean store.retention_ms?"), "{text}");
    // An error about the whole points at the key it names first.
    let p = write("[server]\nlisten = \"127.0.0.1:8080\"\n\n[llm]\nchain = [\"nope\"]\n");
    let text = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(text.contains(":5: llm.chain names \"nope\""), "{text}");
    // A misspelt section gets the one meant, its name kept.
    let p = write("[providers.kimi]\nbase_url = \"http://127.0.0.1:9\"\n[acces]\nroles = []\n");
    let text = Config::load(Some(&p), &[]).unwrap_err().to_string();
    assert!(
        text.contains("no [providers] section; did you mean [provider.kimi]?"),
        "{text}"
    );
    assert!(
        text.contains("no [acces] section; did you mean [[access]]?"),
        "{text}"
    );
}

#[test]
fn the_generated_config_is_complete_and_valid() {
    let text = generate();
    for key in keys() {
        let name = key.name.rsplit('.').next().unwrap();
        assert!(text.contains(&format!("{name} = ")), "{} missing", key.name);
    }
    let path = Path::new("generated.toml");
    let (cfg, _) = Config::from_text(Some((path, &text)), &[]).unwrap();
    let default = Config::default_with_env(&[]);
    assert_eq!(cfg.server.max_connections, default.server.max_connections);
    assert!(cfg.remote.is_none() && cfg.llm.providers.is_empty());
    // Uncommenting the optional sections gives a configuration too.
    let all = text
        .replace("# [", "[")
        .replace("# url = \"\"", "url = \"http://x\"");
    assert!(toml::parse(&all).is_ok());
}

#[test]
fn a_cluster_section_needs_servers_and_checks_its_names() {
    let read = |text: &str| Config::from_text(Some((std::path::Path::new("t.toml"), text)), &[]);
    let (cfg, _) =
        read("[cluster]\nnats_url = [\"nats://127.0.0.1:4222\"]\nnode_id = \"box-a\"\n").unwrap();
    let k = cfg.cluster.unwrap();
    assert_eq!(
        (k.node_id.as_str(), k.subject_prefix.as_str()),
        ("box-a", "hivegate")
    );
    assert_eq!(k.heartbeat, std::time::Duration::from_secs(5));
    let (cfg, _) = read("[cluster]\nnats_url = [\"nats://127.0.0.1:4222\"]\n").unwrap();
    assert!(
        crate::cluster::valid_node(&cfg.cluster.unwrap().node_id),
        "the host name, made valid"
    );
    for (text, says) in [
        ("[cluster]\nnode_id = \"a\"\n", "needs nats_url"),
        ("[cluster]\nnats_url = [\"nats://h:x\"]\n", "bad port"),
        (
            "[cluster]\nnats_url = [\"h\"]\nnode_id = \"a.b\"\n",
            "node_id",
        ),
        (
            "[cluster]\nnats_url = [\"h\"]\nsubject_prefix = \"a.>\"\n",
            "subject_prefix",
        ),
        (
            "[cluster]\nnats_url = [\"h\"]\ncredentials_file = \"/nonexistent/creds\"\n",
            "credentials_file",
        ),
    ] {
        let e = read(text).unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
    assert!(Config::default_with_env(&[]).cluster.is_none());
}

#[test]
fn renamed_duration_keys_are_still_read_with_a_warning() {
    let p = write("[auth]\njwt_leeway_s = 5\n[store]\nretention_days = 2\n");
    let env = [(
        "HIVEGATE_CLUSTER_OUTBOX_MAX_AGE_S".to_string(),
        "120".to_string(),
    )];
    // The cluster section needs its own settings to be valid; only the
    // rename is looked at here.
    let (cfg, warnings) = Config::load(Some(&p), &[]).unwrap();
    assert_eq!(
        cfg.store.retention,
        std::time::Duration::from_secs(2 * 86_400)
    );
    assert_eq!(cfg.auth.jwt.leeway_s, 5);
    assert!(
        warnings[0].ends_with(":2: auth.jwt_leeway_s is deprecated: write auth.jwt_leeway_ms = 5000 (durations are in milliseconds)"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("write store.retention_ms = 172800000"),
        "{warnings:?}"
    );
    let errors = Config::load(Some(&p), &env)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        !errors.contains("HIVEGATE_CLUSTER_OUTBOX_MAX_AGE_S names no"),
        "{errors}"
    );
}

#[test]
fn proxies_are_networks_and_the_proxy_protocol_needs_them() {
    let ok = write("[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"fd00::/8\"]\nproxy_protocol = true\n");
    let (cfg, _) = Config::load(Some(&ok), &[]).unwrap();
    assert!(cfg.server.proxy_protocol);
    assert!(cfg
        .server
        .trusted_proxies
        .contains("10.9.8.7".parse().unwrap()));
    let bad = write("[server]\ntrusted_proxies = [\"proxy.example\"]\n");
    let e = Config::load(Some(&bad), &[]).unwrap_err().to_string();
    assert!(
        e.contains(":2:") && e.contains("server.trusted_proxies") && e.contains("10.0.0.0/8"),
        "{e}"
    );
    let lonely = write("[server]\nproxy_protocol = true\n");
    let e = Config::load(Some(&lonely), &[]).unwrap_err().to_string();
    assert!(e.contains("server.trusted_proxies is empty"), "{e}");
}
