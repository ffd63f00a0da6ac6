//! The shipped systemd units (contrib/systemd/) are valid for systemd, start this build's
//! binaries with flags they know, and carry the hardening and credential handling they promise.
//!
//! `systemd-analyze` comes from Debian's systemd package (scripts/install-deps.sh installs it);
//! without it these tests fail rather than pass unchecked.

use std::path::{Path, PathBuf};

use std::process::Command;

/// The repository's `contrib/systemd/<unit>`.
fn unit_text(unit: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .join(unit);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The unit's `ExecStart=` command line, split on spaces (the units use no quoting).
fn exec_start(text: &str) -> Vec<String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    line.split_whitespace().map(str::to_owned).collect()
}

/// The unit with its binaries pointed at this build, in a fresh directory.
fn unit_for_this_build(unit: &str) -> PathBuf {
    let bin_dir = skep_integration::bin_dir();
    let text = unit_text(unit).replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
    let path = skep_integration::unique_dir("systemd").join(unit);
    std::fs::write(&path, text).unwrap();
    path
}

#[track_caller]
fn check_unit(unit: &str, binary: &str, credentials: &[&str]) {
    let text = unit_text(unit);
    // systemd itself: every key known and every value parsed (a typo is only a warning for
    // systemd, so any output at all fails the test), and ExecStart's binary executable.
    let path = unit_for_this_build(unit);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (install Debian's systemd package: scripts/install-deps.sh)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {unit}: {stderr}"
    );

    // The daemon accepts the unit's flags: the same command line with the unit's variables
    // filled in, ending in --version, exits 0 only if every flag before it is known.
    let argv = exec_start(&text);
    assert_eq!(argv[0], format!("/usr/local/bin/{binary}"));
    let filled: Vec<String> = argv[1..]
        .iter()
        .map(|a| {
            a.replace("${STATE_DIRECTORY}", "/var/lib/skep")
                .replace("${SKEP_QUEEN}", "https://queen.lan:7700")
                .replace("%d", "/run/credentials/skep")
        })
        .collect();
    let out = Command::new(skep_integration::bin(binary))
        .args(&filled)
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{binary} refuses the unit's flags {filled:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the units promise in docs/MULTIHOST.md: secrets as credentials, never in argv or
    // Environment=; no privileges; a read-only system; restart on failure.
    for required in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "CapabilityBoundingSet=",
        "UMask=0077",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == required),
            "{unit} lacks {required}"
        );
    }
    for name in credentials {
        assert!(
            text.contains(&format!("LoadCredential={name}:")),
            "{unit} must load {name} as a credential"
        );
    }
    for l in text.lines().filter(|l| l.starts_with("Environment=")) {
        assert!(!l.to_lowercase().contains("token"), "a secret in {l}");
    }
    assert!(
        !argv.iter().any(|a| a.contains("token")
            && !a.starts_with("%d/")
            && !a.starts_with("--token-file")),
        "a secret on ExecStart: {argv:?}"
    );
}

#[test]
fn the_queen_unit_is_valid_hardened_and_matches_the_binary() {
    check_unit("skep-queen.service", "skep-queen", &[]);
}

#[test]
fn the_pool_unit_is_valid_hardened_and_reads_its_token_as_a_credential() {
    check_unit("skep-pool.service", "skep-pool", &["pool-token"]);
    let argv = exec_start(&unit_text("skep-pool.service"));
    let at = argv.iter().position(|a| a == "--token-file").unwrap();
    assert_eq!(argv[at + 1], "%d/pool-token");
}
