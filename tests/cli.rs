//! The `leaderlink` binary's command line: help, bad values (exit code 64), config files.

use std::process::Command;

fn leaderlink(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leaderlink"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("runs")
}

#[test]
fn serve_help_documents_every_option() {
    let out = leaderlink(&["serve", "--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--bootstrap",
        "--max-in-flight",
        "--config",
        "--dev-topics",
        "--dev-leader-latency-ms",
        "LEADERLINK_BOOTSTRAP",
        "--compression",
        "LEADERLINK_COMPRESSION",
        // The produce features beyond flags.
        "partition -1",
        "toPositive(murmur2(key)) % partition count",
        "record_errors",
    ] {
        assert!(help.contains(opt), "{opt} missing from:\n{help}");
    }
}

#[test]
fn bad_values_exit_64_with_a_clear_message() {
    for (args, env, needle) in [
        (
            vec!["serve", "--max-in-flight", "zero"],
            vec![],
            "--max-in-flight",
        ),
        (
            vec!["serve", "--max-in-flight", "0"],
            vec![],
            "max_in_flight",
        ),
        (vec!["serve", "--listen", "nowhere"], vec![], "--listen"),
        (
            vec!["serve"],
            vec![("LEADERLINK_BOOTSTRAP", "no-port")],
            "bootstrap",
        ),
        (vec!["serve", "--dev-topics", "x:0"], vec![], "dev.topics"),
        // A variable is read by one path, which names it when its value is bad.
        (
            vec!["serve"],
            vec![("LEADERLINK_MAX_IN_FLIGHT", "zero")],
            "LEADERLINK_MAX_IN_FLIGHT",
        ),
        (
            vec!["serve", "--config", "/nonexistent/leaderlink.toml"],
            vec![],
            "cannot read",
        ),
        (vec!["frobnicate"], vec![], "frobnicate"),
        // An unknown codec name, by flag and by variable: the known ones are listed.
        (
            vec!["serve", "--compression", "brotli"],
            vec![],
            "[possible values: none, gzip, snappy, lz4, zstd]",
        ),
        (
            vec!["serve"],
            vec![("LEADERLINK_COMPRESSION", "lz5")],
            "unknown variant `lz5`, expected one of `none`, `gzip`, `snappy`, `lz4`, `zstd`",
        ),
    ] {
        let out = leaderlink(&args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn config_file_keys_are_checked_and_flags_override_env() {
    let dir = std::env::temp_dir().join(format!("leaderlink-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "max_in_flight = 16\nconnections_per_leader = 0\n").unwrap();
    let out = leaderlink(&["serve", "--config", f.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connections_per_leader"));

    // The environment says 5 (valid), the flag says 0 (invalid): the flag wins.
    let out = leaderlink(
        &["serve", "--max-in-flight", "0"],
        &[("LEADERLINK_MAX_IN_FLIGHT", "5")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_in_flight"));
    // And the environment overrides the file.
    let ok = dir.join("ok.toml");
    std::fs::write(
        &ok,
        "max_in_flight = 16
",
    )
    .unwrap();
    let out = leaderlink(
        &["serve", "--config", ok.to_str().unwrap()],
        &[("LEADERLINK_MAX_IN_FLIGHT", "0")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_in_flight"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_check_prints_the_effective_config_or_names_the_bad_key() {
    let dir = std::env::temp_dir().join(format!("leaderlink-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "bootstrap = [\"k1:9092\"]\nadmin_token = \"hunter2\"\nmax_concurrent_calls = 64\n",
    )
    .unwrap();
    let out = leaderlink(&["config", "check", good.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("max_concurrent_calls = 64"), "{stdout}");
    assert!(
        stdout.contains("max_in_flight = 1024"),
        "defaults are shown: {stdout}"
    );
    assert!(
        !stdout.contains("hunter2"),
        "secrets are redacted: {stdout}"
    );

    for (text, key) in [
        ("max_concurrent_calls = 0\n", "max_concurrent_calls"),
        ("shutdown_grace_ms = \"soon\"\n", "shutdown_grace_ms"),
        ("[dev]\nbrokerz = 3\n", "brokerz"),
        (
            "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:1\"\n",
            "admin_listen",
        ),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = leaderlink(&["config", "check", bad.to_str().unwrap()], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
