//! Deployment files cannot be run here (no Docker engine): check they parse and agree with the
//! code (environment overrides name real config keys, the image's config path is the one used).

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .build()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .try_deserialize()
        .unwrap()
}

#[test]
fn compose_file_parses_and_its_overrides_are_valid_config() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "topics", "convoflow", "producer"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let env = services["convoflow"]["environment"].as_object().unwrap();
    let overrides: Vec<(String, String)> =
        env.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    let cfg = convoflow::config::Config::load_with_env(Some(&root().join("convoflow.yaml")), overrides).unwrap();
    assert_eq!(cfg.kafka.brokers, "kafka:9092");
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("/etc/convoflow/convoflow.yaml"));
    let producer_cmd = services["producer"]["command"].as_array().unwrap();
    assert!(producer_cmd.iter().any(|a| a == "/etc/convoflow/convoflow.yaml"));
}
