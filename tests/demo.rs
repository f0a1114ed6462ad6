//! `convoflow demo` runs end to end on librdkafka's in-process mock cluster and the embedded
//! Qdrant engine, offline, with the models scripts/setup installs.

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
    // the points were indexed in the embedded store and searched
    let indexed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("indexed points: ")?.trim().parse().ok())
        .expect("an 'indexed points' line");
    let chunks: usize = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("chunks (Qdrant points)")?.trim().parse().ok())
        .expect("a chunks line");
    assert_eq!(indexed, chunks, "{stdout}");
    assert_eq!(stdout.matches("search \"").count(), 3, "{stdout}");
    assert!(stdout.contains("#  score   conversation"), "a result table: {stdout}");
    // with scripts/env.sh's models (scripts/test): the hybrid path and the model outputs
    if std::env::var_os("CONVOFLOW_E5_SMALL").is_some() && std::env::var_os("CONVOFLOW_MODEL_FIXTURES").is_some() {
        assert!(stdout.contains("(dense + BM25, RRF)"), "{stdout}");
        assert!(stdout.contains("UNTRAINED"), "random fixtures are labelled: {stdout}");
        assert!(stdout.contains("sentiment (turns per star)") && stdout.contains("model embedding"), "{stdout}");
    }
}
