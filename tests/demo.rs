//! `convoflow demo` runs end to end on librdkafka's in-process mock cluster and the embedded
//! Qdrant engine, offline, with the models scripts/setup installs.

use std::process::Command;

#[test]
fn demo_enriches_every_sample_event_and_prints_a_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["demo", "--conversations", "12", "--timeout-s", "120"])
        .env_remove("CONVOFLOW__LLM__URL")
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
    // no LLM endpoint: it says how to configure one (tests/ask.rs runs the demo with one)
    assert!(stdout.contains("ask: no LLM endpoint configured") && stdout.contains("CONVOFLOW__LLM__URL") && stdout.contains("scripts/llm-server start"), "{stdout}");
    // with scripts/env.sh's models (scripts/test): the hybrid path and the model outputs
    if std::env::var_os("CONVOFLOW_E5_SMALL").is_some() && std::env::var_os("CONVOFLOW_MODEL_FIXTURES").is_some() {
        assert!(stdout.contains("(dense + BM25, RRF)"), "{stdout}");
        assert!(stdout.contains("UNTRAINED"), "random fixtures are labelled: {stdout}");
        assert!(stdout.contains("sentiment (turns per star)") && stdout.contains("model embedding"), "{stdout}");
        // routed by language: French turns to the camembert-ner fixture, English to XLM-R's
        let section = |lang: &str| {
            let start = stdout.find(&format!("turns in language {lang}")).unwrap();
            let rest = &stdout[start + 1..];
            rest[..rest.find("turns in language").or_else(|| rest.find("wall time")).unwrap()].to_string()
        };
        assert!(section("fr").contains("NER camembert-ner architecture"), "{stdout}");
        assert!(!section("fr").contains("xlm-roberta"), "{stdout}");
        assert!(section("en").contains("NER xlm-roberta-base-ner-hrl architecture"), "{stdout}");
    }
}

/// A fresh directory for the demo's temporary store (TMPDIR), and what the demo left in it.
fn scratch_tmp(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// Giving up (nothing enriched within --timeout-s) leaves no store directory behind, says what
/// to do, and — run with an empty environment — the binary still finds libtorch (rpath) and the
/// models scripts/setup made (paths recorded at build time).
#[test]
fn a_demo_that_gives_up_cleans_up_and_finds_setups_models_without_the_environment() {
    let tmp = scratch_tmp("gives-up");
    let out = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["demo", "--conversations", "3", "--timeout-s", "1"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("convoflow demo: in-process Kafka"), "{stdout}\n{stderr}");
    if !out.status.success() {
        // 1 s is too short for the group join: nothing came, and the message says what to change
        let published: usize = stdout
            .lines()
            .find_map(|l| l.strip_prefix("published ")?.split(' ').next()?.parse().ok())
            .expect("a 'published N events' line");
        assert!(stderr.contains(&format!("of {published} events were enriched")) && stderr.contains("--timeout-s"), "{stderr}");
        assert!(stderr.contains("after the worker stopped"), "the count is taken when the worker has stopped: {stderr}");
    }
    assert_eq!(leftovers(&tmp), Vec::<String>::new(), "the demo's store is removed:\n{stdout}\n{stderr}");
    let setup_models = std::env::var_os("CONVOFLOW_E5_SMALL")
        .is_some_and(|p| std::path::Path::new(&p).join("config.json").is_file());
    if setup_models {
        // scripts/test runs with scripts/env.sh, as scripts/setup built the binary
        assert!(stdout.contains("intfloat/multilingual-e5-small"), "found without the environment: {stdout}");
    } else if !stdout.contains("embedding  ") {
        assert!(stdout.contains("scripts/setup") && stdout.contains("source scripts/env.sh"), "{stdout}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Ctrl-C stops the worker, removes the store and exits non-zero.
#[test]
fn an_interrupted_demo_cleans_up() {
    use std::io::BufRead;
    let tmp = scratch_tmp("interrupted");
    let mut child = Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .args(["demo", "--conversations", "20"])
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = vec![];
    for line in lines.by_ref() {
        let line = line.unwrap();
        let published = line.starts_with("published ");
        seen.push(line);
        if published {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.starts_with("published ")), "{seen:?}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: a signal to our own child process
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "{seen:?} {rest:?}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(leftovers(&tmp), Vec::<String>::new(), "the demo's store is removed:\n{stderr}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
