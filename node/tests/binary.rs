//! The `civex-node` binary refuses a bad config before binding anything
//! (the end-to-end tests in `tests/` run it for real).

use std::process::Command;

#[test]
fn a_missing_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_civex-node"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("absent.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "origin = \"Bad Origin\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_civex-node"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node.toml: origin: origin id \"Bad Origin\""),
        "{stderr}"
    );
}
