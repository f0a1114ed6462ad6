//! The models routed by language as the reference set-up routes them (the CPU test fixtures),
//! and a conversation that switches language turn by turn: shared by the worker's routing test
//! (tests/worker_models.rs) and the model API's parity test (tests/model_api.rs).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use convoflow::config::{Config, ModelConfig, ModelList};
use convoflow::event::{Conversation, EnrichedConversation};
use convoflow::sample::SampleGenerator;

use super::serving::env_path;
use super::{Topics, create_topic, in_process_config, produce_conversations, read_topic};

/// A CPU fp32 model of the fixtures (no prefix or template, every language).
pub fn model(name: &str, path: PathBuf) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        path,
        dtype: "fp32".into(),
        batch_size: 64,
        max_batch_tokens: 8_192,
        document_prefix: String::new(),
        query_template: "{query}".into(),
        languages: vec![],
    }
}

pub const CAMEMBERT: &str = "camembert-ner (random)";
pub const XLMR: &str = "xlm-roberta-base-ner-hrl (random)";
pub const SENTIMENT: &str = "bert-base-multilingual-uncased-sentiment architecture (random, untrained)";
/// The languages the sentiment model is given (nlptown's six).
pub const SENTIMENT_LANGUAGES: [&str; 6] = ["en", "nl", "de", "fr", "it", "es"];

/// The mixed conversation's turns: (text, the language lingua should find, how it is known).
pub const MIXED: &[(&str, &str, &str)] = &[
    ("Bonjour, je voudrais savoir pourquoi ma facture a encore augmenté ce mois-ci.", "fr", "detected"),
    ("Hello, I have been waiting for my refund from your London office for three weeks now.", "en", "detected"),
    ("Guten Tag, mein Paket ist immer noch nicht in Berlin angekommen, können Sie mir helfen?", "de", "detected"),
    ("مرحبا، لم يصل طلبي بعد إلى القاهرة، هل يمكنك مساعدتي من فضلك؟", "ar", "detected"),
    ("Dzień dobry, chciałbym zapytać o status mojego zamówienia z Warszawy.", "pl", "detected"),
    ("Merci !", "fr", "inherited"),
    ("Le technicien passera jeudi matin à Toulouse pour vérifier la box.", "fr", "detected"),
    ("Danke, dann warte ich noch auf das Paket bis Freitag.", "de", "detected"),
    ("D'accord, je vous remercie beaucoup pour votre aide et votre patience.", "fr", "detected"),
];

/// The mixed conversation as a producer without a `language` field sends it.
pub fn mixed_conversation() -> Conversation {
    let mut event = SampleGenerator::new(31).conversation(1);
    let template = event.turns[0].clone();
    event.language = None; // as most real producers send it
    event.turns = MIXED
        .iter()
        .enumerate()
        .map(|(i, (text, _, _))| convoflow::event::Turn {
            turn_id: format!("t{i}"),
            text: text.to_string(),
            ts: template.ts + i as i64 * 1000,
            ..template.clone()
        })
        .collect();
    event
}

/// `cfg`'s models routed as the reference set-up is: all-MiniLM-L6-v2 embeddings, camembert-ner
/// for French, the XLM-R NER model for its ten languages (not "*", so that a Polish turn is
/// covered by no NER model), the sentiment model for its six.
pub fn route_models(cfg: &mut Config) {
    let fixtures = env_path("CONVOFLOW_MODEL_FIXTURES");
    let with = |mut m: ModelConfig, languages: &[&str]| {
        m.languages = languages.iter().map(|l| l.to_string()).collect();
        m
    };
    cfg.models.embedding = Some(model("sentence-transformers/all-MiniLM-L6-v2", env_path("CONVOFLOW_MINILM")));
    cfg.models.ner = ModelList(vec![
        with(model(CAMEMBERT, fixtures.join("ner-camembert")), &["fr"]),
        with(model(XLMR, fixtures.join("ner-xlmr")), &["ar", "de", "en", "es", "it", "lv", "nl", "pt", "zh"]),
    ]);
    cfg.models.sentiment = ModelList(vec![with(model(SENTIMENT, fixtures.join("sentiment-bert")), &SENTIMENT_LANGUAGES)]);
}

/// The mixed conversation enriched by an in-process worker with the routed models, through the
/// real broker on topics named after `prefix`.
pub struct EnrichedMixed {
    /// The worker's configuration (its store directory, closed again, holds the points).
    pub cfg: Config,
    pub sent: Conversation,
    pub enriched: EnrichedConversation,
}

/// Produces the mixed conversation, runs the worker until its enriched event is out, stops it.
pub async fn enrich_mixed(prefix: &str) -> EnrichedMixed {
    let topics = Topics::new(prefix);
    create_topic(&topics.input, 1).await;
    let sent = mixed_conversation();
    produce_conversations(&topics.input, std::slice::from_ref(&sent)).await;
    let mut cfg = in_process_config(&topics);
    route_models(&mut cfg);
    let store = convoflow::sink::store::open(&cfg.qdrant).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(convoflow::worker::run_with_store(cfg.clone(), stop.clone(), store.clone()));
    let output = topics.output.clone();
    let records = tokio::task::spawn_blocking(move || read_topic(&output, 1, Duration::from_secs(180), Duration::from_millis(500)))
        .await
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), worker).await.unwrap().unwrap().unwrap();
    drop(store); // what reads the store next opens the same directory
    assert_eq!(records.len(), 1);
    EnrichedMixed { enriched: records[0].enriched(), cfg, sent }
}
