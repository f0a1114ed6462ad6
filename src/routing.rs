//! Which model of a task each turn goes to, by the turn's language (`models.ner` and
//! `models.sentiment` as lists, docs/models.md "Models by language"): the model that names the
//! turn's language, else the task's `*` model, else none — and then the turn says why it has no
//! output (`SkipReason`) instead of getting a guess from a model that never saw its language.
//! Embeddings go through the same routes with one model for every language.

use std::collections::HashMap;

use anyhow::{Result, bail};

use crate::config::ModelConfig;
use crate::language;

/// The `languages` entry of the model that takes every language no other model names.
pub const ANY: &str = "*";

/// Why a turn got no output from a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The turn's language is known and no model of the task covers it.
    UnsupportedLanguage,
    /// Nothing told the turn's language and the task has no `*` model.
    UnknownLanguage,
}

impl SkipReason {
    /// The value of the event's `entities_skipped` / `sentiment_skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::UnsupportedLanguage => "unsupported-language",
            SkipReason::UnknownLanguage => "unknown-language",
        }
    }
}

/// Where one turn goes for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The index of the model in the task's list.
    Model(usize),
    Skipped(SkipReason),
}

/// A task's routes: language → model.
#[derive(Debug, Clone)]
pub struct Routes {
    by_language: HashMap<String, usize>,
    fallback: Option<usize>,
    models: usize,
    /// The codes this build knows (a trusted event field may name something else).
    known: Vec<&'static str>,
}

impl Routes {
    /// The routes of a task's configured models (`task`: ner, sentiment; for the messages).
    /// Refuses a list whose models do not say their languages, a language (or `*`) claimed by
    /// two models, and codes this build does not know.
    pub fn new(task: &str, models: &[ModelConfig]) -> Result<Self> {
        let mut by_language: HashMap<String, usize> = HashMap::new();
        let mut fallback: Option<usize> = None;
        let known = language::known();
        for (i, m) in models.iter().enumerate() {
            if m.languages.is_empty() {
                if models.len() == 1 {
                    fallback = Some(0); // one model, as before routing: every language
                    continue;
                }
                bail!(
                    "models.{task}[{i}] ({}) names no languages: with several {task} models each says which turn languages \
                     it takes (languages: [fr, ...]), and [\"*\"] marks the one for every other language",
                    m.name
                );
            }
            for code in &m.languages {
                let claimed = if code.trim() == ANY {
                    fallback.replace(i).map(|other| (ANY.to_string(), other))
                } else {
                    let c = language::normalize(code);
                    if !known.contains(&c.as_str()) {
                        bail!(
                            "models.{task}[{i}] ({}): {code:?} is no language this build knows; give ISO 639-1 codes ({}) or \"*\"",
                            m.name,
                            known.join(", ")
                        );
                    }
                    by_language.insert(c.clone(), i).map(|other| (c, other))
                };
                if let Some((code, other)) = claimed {
                    let who = if other == i {
                        format!("{} names {code:?} twice", m.name)
                    } else {
                        format!("both {} and {} claim {code:?}", models[other].name, m.name)
                    };
                    bail!("models.{task}: {who}; each language goes to one model");
                }
            }
        }
        Ok(Self { by_language, fallback, models: models.len(), known })
    }

    /// The routes of a task that must cover every turn (embeddings: each point needs its dense
    /// vector): refuses `languages` without `*`.
    pub fn covering_all(task: &str, model: &ModelConfig) -> Result<Self> {
        let routes = Self::new(task, std::slice::from_ref(model))?;
        if routes.fallback.is_none() || !routes.by_language.is_empty() {
            bail!(
                "models.{task} ({}) takes every turn (each point needs its dense vector): leave its languages out or set [\"*\"]",
                model.name
            );
        }
        Ok(routes)
    }

    /// Per model (in list order) the languages routed to it, sorted; `*` for the fallback.
    pub fn languages(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = vec![vec![]; self.models];
        for (code, &i) in &self.by_language {
            out[i].push(code.clone());
        }
        for l in &mut out {
            l.sort();
        }
        if let Some(i) = self.fallback {
            out[i].push(ANY.to_string());
        }
        out
    }

    /// The model for a turn in `language` (ISO 639-1, as `language` resolved it).
    pub fn route(&self, language: Option<&str>) -> Route {
        let named = language.and_then(|l| self.by_language.get(l).copied());
        match (named, self.fallback, language) {
            (Some(i), _, _) | (None, Some(i), _) => Route::Model(i),
            (None, None, Some(l)) if self.known.contains(&l) => Route::Skipped(SkipReason::UnsupportedLanguage),
            // no language, or a trusted event field that names none this build knows ("eng")
            (None, None, _) => Route::Skipped(SkipReason::UnknownLanguage),
        }
    }

    /// How many models the task has.
    pub fn models(&self) -> usize {
        self.models
    }

    /// Whether a model takes the turns no other names (`*`, or a task's one model without
    /// `languages`).
    pub fn has_fallback(&self) -> bool {
        self.fallback.is_some()
    }

    /// The languages models name, sorted.
    pub fn named_languages(&self) -> Vec<&str> {
        let mut codes: Vec<&str> = self.by_language.keys().map(String::as_str).collect();
        codes.sort_unstable();
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, languages: &[&str]) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            path: "/nowhere".into(),
            dtype: "fp32".into(),
            batch_size: 8,
            max_batch_tokens: 512,
            document_prefix: String::new(),
            query_template: "{query}".into(),
            languages: languages.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn a_language_goes_to_its_model_and_the_rest_to_the_fallback() {
        let routes = Routes::new("ner", &[model("camembert", &["fr"]), model("xlmr", &["*"])]).unwrap();
        assert_eq!(routes.route(Some("fr")), Route::Model(0));
        assert_eq!(routes.route(Some("de")), Route::Model(1));
        assert_eq!(routes.route(Some("ja")), Route::Model(1));
        assert_eq!(routes.route(None), Route::Model(1), "an unknown language still has the * model");
        // as /v1/models lists them
        let with = Routes::new("ner", &[model("xlmr", &["*", "de"]), model("camembert", &["fr", "FR-ca"])]);
        assert!(with.is_err(), "fr claimed twice");
        let listed = Routes::new("ner", &[model("xlmr", &["*", "it", "de"]), model("camembert", &["fr"])]).unwrap().languages();
        assert_eq!(listed, vec![vec!["de".to_string(), "it".into(), "*".into()], vec!["fr".into()]]);
    }

    #[test]
    fn without_a_fallback_other_languages_are_skipped_with_the_reason() {
        let routes = Routes::new("sentiment", &[model("nlptown", &["en", "nl", "de", "fr", "it", "es"])]).unwrap();
        assert_eq!(routes.route(Some("de")), Route::Model(0));
        assert_eq!(routes.route(Some("ar")), Route::Skipped(SkipReason::UnsupportedLanguage));
        assert_eq!(routes.route(None), Route::Skipped(SkipReason::UnknownLanguage));
        assert_eq!(routes.route(Some("eng")), Route::Skipped(SkipReason::UnknownLanguage), "no language this build knows");
        assert_eq!(SkipReason::UnsupportedLanguage.as_str(), "unsupported-language");
    }

    #[test]
    fn one_model_without_languages_takes_every_turn_as_before() {
        let routes = Routes::new("ner", &[model("camembert", &[])]).unwrap();
        assert_eq!(routes.route(Some("ar")), Route::Model(0));
        assert_eq!(routes.route(None), Route::Model(0));
        assert_eq!(Routes::new("ner", &[]).unwrap().route(Some("fr")), Route::Skipped(SkipReason::UnsupportedLanguage));
    }

    #[test]
    fn codes_are_normalised_like_the_event_s_field() {
        let routes = Routes::new("ner", &[model("a", &["fr-FR"]), model("b", &["EN"])]).unwrap();
        assert_eq!(routes.route(Some("fr")), Route::Model(0));
        assert_eq!(routes.route(Some("en")), Route::Model(1));
    }

    #[test]
    fn config_mistakes_are_refused_clearly() {
        let err = |models: &[ModelConfig]| Routes::new("ner", models).unwrap_err().to_string();
        let twice = err(&[model("camembert", &["fr"]), model("xlmr", &["fr", "*"])]);
        assert!(twice.contains("both camembert and xlmr claim \"fr\""), "{twice}");
        let two_fallbacks = err(&[model("a", &["*"]), model("b", &["*"])]);
        assert!(two_fallbacks.contains("both a and b claim \"*\""), "{two_fallbacks}");
        let silent = err(&[model("camembert", &["fr"]), model("xlmr", &[])]);
        assert!(silent.contains("models.ner[1] (xlmr) names no languages") && silent.contains("[\"*\"]"), "{silent}");
        let unknown = err(&[model("camembert", &["fr", "xx"])]);
        assert!(unknown.contains("\"xx\" is no language this build knows") && unknown.contains("ISO 639-1"), "{unknown}");
        let repeated = err(&[model("camembert", &["fr", "fr"])]);
        assert!(repeated.contains("camembert names \"fr\" twice"), "{repeated}");
        let partial = Routes::covering_all("embedding", &model("e5", &["fr"])).unwrap_err().to_string();
        assert!(partial.contains("each point needs its dense vector"), "{partial}");
        let mixed = Routes::covering_all("embedding", &model("e5", &["fr", "*"])).unwrap_err().to_string();
        assert!(mixed.contains("each point needs its dense vector"), "{mixed}");
        assert!(Routes::covering_all("embedding", &model("e5", &[])).is_ok());
    }
}
