//! Typed Kafka security against the real broker's SASL_SSL listener (SCRAM-SHA-512; a CA and a
//! broker certificate made by scripts/kafka at start). scripts/test exports
//! KAFKA_SASL_SSL_BROKERS, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SSL_CA.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use convoflow::config::{Config, KafkaSecurity, SaslConfig, SaslMechanism, Secret, SecurityProtocol, TlsConfig};
use convoflow::sample::SampleGenerator;
use convoflow::kafka::admin;
use convoflow::worker;

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test"))
}

fn sasl_ssl(password: &str, ca: PathBuf) -> KafkaSecurity {
    KafkaSecurity {
        protocol: SecurityProtocol::SaslSsl,
        sasl: SaslConfig {
            mechanism: SaslMechanism::ScramSha512,
            username: Some(env("KAFKA_SASL_USERNAME")),
            password: Some(Secret::new(password)),
            token_endpoint: None,
        },
        tls: TlsConfig { ca: Some(ca), ..Default::default() },
    }
}

fn secure_config(topics: &Topics, security: KafkaSecurity) -> Config {
    let mut cfg = in_process_config(topics);
    cfg.kafka.brokers = env("KAFKA_SASL_SSL_BROKERS");
    cfg.kafka.security = security;
    cfg.pipeline.shutdown_timeout_ms = 3_000;
    cfg.qdrant.dense_dim = Some(8);
    cfg
}

/// Every client of the worker (metadata probe, admin, consumer, producer, lag monitor) talks
/// SASL_SSL: conversations produced on the plaintext listener come out enriched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_end_to_end_over_sasl_ssl() {
    let topics = Topics::new("sasl-ssl");
    create_topic(&topics.input, 2).await;
    let g = SampleGenerator::new(5);
    let convs: Vec<_> = (0..10).map(|i| g.conversation(i)).collect();
    produce_conversations(&topics.input, &convs).await;
    let cfg = secure_config(&topics, sasl_ssl(&env("KAFKA_SASL_PASSWORD"), env("KAFKA_SSL_CA").into()));
    let stop = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(worker::run(cfg, stop.clone()));
    let out = topics.output.clone();
    let got = tokio::task::spawn_blocking(move || read_topic(&out, 10, Duration::from_secs(60), Duration::ZERO).len());
    assert_eq!(got.await.unwrap(), 10);
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), run).await.unwrap().unwrap().unwrap();
    // and what it committed is visible on the plaintext listener
    assert_eq!(committed(&topics.group, &topics.input).values().sum::<i64>(), 10);
}

/// A wrong password ends within seconds with librdkafka's authentication reason (not a
/// transport failure after the metadata timeout), and the password appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_fast_and_says_so() {
    let topics = Topics::new("sasl-wrong");
    create_topic(&topics.input, 1).await;
    let wrong = "not-the-password-0123456789";
    let cfg = secure_config(&topics, sasl_ssl(wrong, env("KAFKA_SSL_CA").into()));
    let started = Instant::now();
    let err = format!("{:#}", worker::run(cfg.clone(), Arc::new(AtomicBool::new(false))).await.expect_err("refused"));
    let took = started.elapsed();
    assert!(err.contains("Authentication failed"), "{err}");
    assert!(!err.contains(wrong), "the secret leaked: {err}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    assert!(!format!("{cfg:?}").contains(wrong), "Debug shows the secret");
    assert!(!serde_json::to_string(&cfg).unwrap().contains(wrong), "Serialize shows the secret");
    // `convoflow check` says the broker refused, not that none answered (before: both, the
    // second with a hint to change kafka.brokers)
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convoflow"))
        .arg("check")
        .env("CONVOFLOW__KAFKA__BROKERS", env("KAFKA_SASL_SSL_BROKERS"))
        .env("CONVOFLOW__KAFKA__INPUT_TOPIC", &topics.input)
        .env("CONVOFLOW__KAFKA__SECURITY__PROTOCOL", "sasl_ssl")
        .env("CONVOFLOW__KAFKA__SECURITY__SASL__MECHANISM", "SCRAM-SHA-512")
        .env("CONVOFLOW__KAFKA__SECURITY__SASL__USERNAME", env("KAFKA_SASL_USERNAME"))
        .env("CONVOFLOW__KAFKA__SECURITY__SASL__PASSWORD", wrong)
        .env("CONVOFLOW__KAFKA__SECURITY__TLS__CA", env("KAFKA_SSL_CA"))
        .env("CONVOFLOW__QDRANT__DATA_DIR", store_dir(&topics.group, "check"))
        .env("CONVOFLOW__QDRANT__DENSE_DIM", "8")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("refused the connection") && text.contains("Authentication failed"), "{text}");
    assert!(!text.contains("no Kafka broker answered"), "{text}");
    assert!(!text.contains(wrong), "the secret leaked: {text}");
}

/// A broker certificate the configured CA did not sign: a TLS error at once.
#[test]
fn an_untrusted_broker_certificate_fails_fast() {
    let topics = Topics::new("tls-untrusted");
    // any other CA: the system bundle does not hold the test CA
    let system = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    let cfg = secure_config(&topics, sasl_ssl(&env("KAFKA_SASL_PASSWORD"), system));
    let started = Instant::now();
    let err = format!("{:#}", admin::partition_count(&cfg.kafka, &topics.input, Duration::from_secs(15)).unwrap_err());
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

/// Secrets never appear in errors: a misspelt librdkafka property's value (which may be a
/// password set under the wrong name) is left out, and secret-looking keys in the pass-through
/// map are refused before any client sees them.
#[test]
fn misnamed_properties_never_print_their_values() {
    let topics = Topics::new("misnamed");
    let mut cfg = secure_config(&topics, sasl_ssl(&env("KAFKA_SASL_PASSWORD"), env("KAFKA_SSL_CA").into()));
    cfg.kafka.client.insert("fetch.wait.max.mss".into(), "hunter2-secret".into());
    let err = format!("{:#}", admin::partition_count(&cfg.kafka, &topics.input, Duration::from_secs(5)).unwrap_err());
    assert!(err.contains("fetch.wait.max.mss") && !err.contains("hunter2"), "{err}");
    let env = [("CONVOFLOW__KAFKA__CLIENT__SASL_PASSWORD".to_string(), "hunter2".to_string())];
    let err = format!("{:#}", Config::load_with_env(None, env).unwrap_err());
    assert!(err.contains("kafka.security") && !err.contains("hunter2"), "{err}");
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("misnamed") + ".yaml");
    std::fs::write(&file, "kafka:\n  client:\n    sasl.pasword: hunter2\n").unwrap();
    let err = format!("{:#}", Config::load_with_env(Some(&file), []).unwrap_err());
    assert!(err.contains("sasl.pasword") && err.contains("kafka.security") && !err.contains("hunter2"), "{err}");
}

/// A secret pasted into a field that is not a secret (an enum, a number) is not echoed by the
/// parse error, from the environment or from a file, wherever it sits under `security`, `sasl`,
/// `tls`, `api_key` or `password` (before: `unknown variant `SCRAM-hunter2-...`).
#[test]
fn parse_errors_never_echo_values_of_security_fields() {
    let pasted = "SCRAM-hunter2-Sup3rSecret";
    let env = [("CONVOFLOW__KAFKA__SECURITY__SASL__MECHANISM".to_string(), pasted.to_string())];
    let err = format!("{:#}", Config::load_with_env(None, env).unwrap_err());
    assert!(err.contains("mechanism") && !err.contains("hunter2"), "{err}");
    let env = [("CONVOFLOW__KAFKA__SECURITY__PROTOCOL".to_string(), "sasl_hunter2".to_string())];
    let err = format!("{:#}", Config::load_with_env(None, env).unwrap_err());
    assert!(err.contains("protocol") && !err.contains("hunter2"), "{err}");
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("pasted") + ".yaml");
    std::fs::write(&file, format!("kafka:\n  security:\n    sasl:\n      mechanism: {pasted}\n")).unwrap();
    let err = format!("{:#}", Config::load_with_env(Some(&file), []).unwrap_err());
    assert!(err.contains("mechanism") && !err.contains("hunter2"), "{err}");
    // other fields' values are still shown: they help and are not secret
    let env = [("CONVOFLOW__PIPELINE__TOMBSTONE_SCOPE".to_string(), "everywhere".to_string())];
    let err = format!("{:#}", Config::load_with_env(None, env).unwrap_err());
    assert!(err.contains("everywhere"), "{err}");
}
