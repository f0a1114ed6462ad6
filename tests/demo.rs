//! `convoflow demo` runs end to end on librdkafka's in-process mock cluster, offline.

use std::process::Command;

#[test]
fn demo_enriches_every_sample_event_and_prints_a_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["demo", "--conversations", "12", "--timeout-s", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let published: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("published ")?.split(' ').next()?.parse().ok())
        .expect("a 'published N events' line");
    let enriched: usize = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("events enriched (one per input)")?.trim().parse().ok())
        .expect("an 'events enriched' summary line");
    assert_eq!(enriched, published, "{stdout}");
    assert!(stdout.contains("turns in language fr") && stdout.contains("turns in language en"), "{stdout}");
}
