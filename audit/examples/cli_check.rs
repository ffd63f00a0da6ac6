//! Temporary harness: compiles cli/src/audit.rs standalone.
#[path = "../../cli/src/audit.rs"]
mod audit;
use clap::Parser;
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: audit::AuditCommand,
}
fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("mklog") {
        let dir = std::path::PathBuf::from(std::env::args().nth(2).unwrap());
        let key = skep_audit::AuditKey::load_or_create(&dir.join("key")).unwrap();
        let mut log = skep_audit::AuditLog::open(&dir.join("log"), key, Default::default()).unwrap();
        for i in 0..10 {
            log.append(skep_audit::events::JOB_SUBMITTED, "a3f2c1", skep_audit::Fields::new().job(&format!("job-{i}")).prompt("hi")).unwrap();
        }
        println!("{}", log.checkpoint().to_json());
        return std::process::ExitCode::SUCCESS;
    }
    if std::env::args().nth(1).as_deref() == Some("bench") {
        let dir = std::path::PathBuf::from(std::env::args().nth(2).unwrap());
        for fsync in [skep_audit::FsyncPolicy::Never, skep_audit::FsyncPolicy::Batch(64), skep_audit::FsyncPolicy::EveryEntry] {
            let _ = std::fs::remove_dir_all(dir.join("b"));
            let key = skep_audit::AuditKey::load_or_create(&dir.join("key")).unwrap();
            let mut log = skep_audit::AuditLog::open(&dir.join("b"), key, skep_audit::AuditOptions { max_file_bytes: 64 << 20, fsync }).unwrap();
            let n = if fsync == skep_audit::FsyncPolicy::EveryEntry { 2000 } else { 50_000 };
            let t = std::time::Instant::now();
            for i in 0..n {
                log.append(skep_audit::events::JOB_COMPLETED, "a3f2c1", skep_audit::Fields::new().job(&format!("job-{i}")).node("gpu-01").num("tokens", 17)).unwrap();
            }
            let el = t.elapsed();
            println!("{fsync:?}: {n} appends in {el:?} = {:.1} us/append", el.as_secs_f64() * 1e6 / n as f64);
            let t = std::time::Instant::now();
            let v = skep_audit::verify(&[dir.join("b")], Some(&skep_audit::AuditKey::from_file(&dir.join("key")).unwrap()), None);
            println!("  verify: {:?} in {:?}", v.exit_code(), t.elapsed());
        }
        return std::process::ExitCode::SUCCESS;
    }
    audit::run(Cli::parse().command)
}
