//! The `civex` binary answers for itself (the end-to-end tests in `tests/`
//! drive every subcommand against real nodes).

use std::process::Command;

#[test]
fn help_lists_every_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_civex"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "init", "publish", "offer", "query", "feed", "status", "verify", "demo", "bench",
    ] {
        assert!(text.contains(command), "--help lacks {command}: {text}");
    }
}

#[test]
fn a_wrong_flag_is_refused_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_civex"))
        .args(["status", "--colour"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--colour"));
}
