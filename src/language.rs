//! Each turn's language: the event's `language` when the producer set it (and
//! `pipeline.language.trust_event`), otherwise detected from the turn's text with `lingua`
//! (chosen over `whatlang` by accuracy on real short text: docs/models.md). A turn too short or
//! too ambiguous to tell inherits its conversation's majority language; the conversation's
//! language is the event's, or else that majority.
//!
//! Detection is per turn and pure, so the prepare stage runs it beside the chunking on rayon's
//! pool; the majority needs every turn, so it is decided after (`Languages::resolve`).

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{Result, bail};
use lingua::{IsoCode639_1, Language, LanguageDetectorBuilder};

use crate::config::LanguageConfig;

/// Characters of a turn that detection reads: the language of a long turn is clear from its
/// beginning, and lingua's cost grows with the text.
const DETECT_CHARS: usize = 1_000;

/// Where a turn's language came from (the event's `language_source` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanguageSource {
    /// The event's `language` field.
    Event,
    /// Detected from the turn's own text.
    Detected,
    /// The conversation's majority language (the turn was too short or too ambiguous).
    Inherited,
}

impl LanguageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Detected => "detected",
            Self::Inherited => "inherited",
        }
    }
}

/// One turn's language.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnLanguage {
    /// ISO 639-1 code, lower case (`fr`).
    pub code: String,
    /// Detected: lingua's confidence in it relative to the other candidates (0..1); inherited:
    /// the share of the conversation's detected turns in that language; from the event: 1.
    pub confidence: f32,
    pub source: LanguageSource,
}

/// What detection found in one turn (before the conversation's majority is known).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub code: &'static str,
    pub confidence: f32,
}

/// The languages of one conversation: one per turn (None: nothing told, neither the event
/// nor any of its turns), and the conversation's.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationLanguages {
    pub turns: Vec<Option<TurnLanguage>>,
    pub conversation: Option<String>,
}

/// Every language this build can detect (lingua's language models are compiled in, one Cargo
/// feature each: adding one is a line in Cargo.toml and a row in the accuracy corpus).
pub fn known() -> Vec<&'static str> {
    let mut codes: Vec<&'static str> = Language::all().into_iter().map(code_of).collect();
    codes.sort_unstable();
    codes
}

/// Letters a text needs before whatlang's answer is taken (`Languages::fast_path`); below,
/// lingua decides (its n-grams up to 5 are what short text needs).
const FAST_MIN_LETTERS: usize = 40;

/// Whether a letter (callers pass alphabetic characters only) is of the Latin script: Basic
/// Latin, Latin-1 Supplement, Latin Extended A/B and Additional.
fn is_latin(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, '\u{00C0}'..='\u{024F}' | '\u{1E00}'..='\u{1EFF}')
}

/// The ISO 639-1 code of a whatlang language this build also detects with lingua.
fn whatlang_code(l: whatlang::Lang) -> Option<&'static str> {
    use whatlang::Lang::*;
    Some(match l {
        Ara => "ar", Cmn => "zh", Nld => "nl", Eng => "en", Fra => "fr", Deu => "de", Ita => "it", Jpn => "ja",
        Lav => "lv", Pol => "pl", Por => "pt", Rus => "ru", Spa => "es", Tur => "tr",
        _ => return None,
    })
}

fn code_of(language: Language) -> &'static str {
    // IsoCode639_1's Display is the lower-case code; the set is small and fixed, so the
    // strings are made once per language
    static CODES: std::sync::OnceLock<HashMap<Language, &'static str>> = std::sync::OnceLock::new();
    CODES.get_or_init(|| {
        Language::all().into_iter().map(|l| (l, &*Box::leak(l.iso_code_639_1().to_string().into_boxed_str()))).collect()
    })[&language]
}

/// The primary subtag of a language tag, lower case: `fr-FR`, `pt_BR`, `EN` → `fr`, `pt`, `en`.
pub fn normalize(tag: &str) -> String {
    tag.split(['-', '_']).next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The event's `language` field as a code, when it names one (`detects` and `resolve` must
/// agree on this: a field that normalises to nothing is no language, and the turns are detected).
fn event_code(event_language: Option<&str>) -> Option<String> {
    event_language.map(normalize).filter(|l| !l.is_empty())
}

/// Detects and resolves turn languages as `pipeline.language` says.
pub struct Languages {
    detector: Option<lingua::LanguageDetector>,
    fast: Option<whatlang::Detector>,
    min_chars: usize,
    min_confidence: f32,
    trust_event: bool,
}

impl Languages {
    /// From `pipeline.language`; refuses codes this build cannot detect.
    pub fn new(cfg: &LanguageConfig) -> Result<Self> {
        if !cfg.detect {
            return Ok(Self::event_only().trusting(cfg.trust_event));
        }
        let candidates: Vec<Language> = if cfg.languages.is_empty() {
            Language::all().into_iter().collect()
        } else {
            let mut picked = Vec::new();
            for code in &cfg.languages {
                let language = IsoCode639_1::from_str(&normalize(code)).ok().map(|c| Language::from_iso_code_639_1(&c));
                match language {
                    Some(l) if !picked.contains(&l) => picked.push(l),
                    Some(_) => bail!("pipeline.language.languages names {code} twice"),
                    None => bail!(
                        "pipeline.language.languages: {code:?} is no language this build detects (ISO 639-1 codes: {})",
                        known().join(", ")
                    ),
                }
            }
            picked
        };
        if candidates.len() < 2 {
            bail!(
                "pipeline.language.languages needs at least two candidates to detect between; for conversations all \
                 in one language, set the events' language field (trust_event) or detect: false"
            );
        }
        let codes: Vec<&'static str> = candidates.iter().map(|l| code_of(*l)).collect();
        // the fast path knows the same candidates
        let allow: Vec<whatlang::Lang> =
            whatlang::Lang::all().iter().copied().filter(|l| whatlang_code(*l).is_some_and(|c| codes.contains(&c))).collect();
        let fast = (!allow.is_empty()).then(|| whatlang::Detector::with_allowlist(allow));
        let detector = Some(LanguageDetectorBuilder::from_languages(&candidates).with_preloaded_language_models().build());
        Ok(Self { detector, fast, min_chars: cfg.min_chars, min_confidence: cfg.min_confidence, trust_event: cfg.trust_event })
    }

    /// Only the events' own `language` field, nothing detected (tests and benches of other stages).
    pub fn event_only() -> Self {
        Self { detector: None, fast: None, min_chars: 0, min_confidence: 0.0, trust_event: true }
    }

    fn trusting(self, trust_event: bool) -> Self {
        Self { trust_event, ..self }
    }

    /// Whether the turns of an event with this `language` field are detected at all.
    pub fn detects(&self, event_language: Option<&str>) -> bool {
        self.detector.is_some() && !(self.trust_event && event_code(event_language).is_some())
    }

    /// The language of one turn's text, when it is long and clear enough to tell.
    pub fn detect(&self, text: &str) -> Option<Detection> {
        let detector = self.detector.as_ref()?;
        let letters = text.chars().filter(|c| c.is_alphabetic()).count();
        if letters < self.min_chars.max(1) {
            return None;
        }
        let end = text.char_indices().nth(DETECT_CHARS).map_or(text.len(), |(i, _)| i);
        // whatlang's answer when it is sure and sure enough; otherwise lingua decides
        if let Some(d) = self.fast_path(&text[..end]).filter(|d| d.confidence >= self.min_confidence) {
            return Some(d);
        }
        let (language, confidence) = detector.compute_language_confidence_values(&text[..end]).into_iter().next()?;
        let confidence = confidence as f32;
        (confidence >= self.min_confidence && confidence > 0.0).then(|| Detection { code: code_of(language), confidence })
    }

    /// whatlang's answer when it is sure on a long enough text written in Latin letters only
    /// (none of lingua's rules by alphabet apply there): ~10 µs instead of lingua's ~200 µs on a
    /// chat turn, and on the corpus of docs/models.md no answer it gives differs in accuracy
    /// from lingua's (measured: every Latin-script language the same to 0.1 point). Other
    /// scripts go to lingua, whose alphabet rules tell Japanese from Chinese where whatlang
    /// does not.
    fn fast_path(&self, text: &str) -> Option<Detection> {
        let fast = self.fast.as_ref()?;
        let (mut letters, mut latin) = (0usize, true);
        for c in text.chars().filter(|c| c.is_alphabetic()) {
            letters += 1;
            latin &= is_latin(c);
        }
        if letters < FAST_MIN_LETTERS || !latin {
            return None;
        }
        let info = fast.detect(text).filter(|i| i.is_reliable())?;
        Some(Detection { code: whatlang_code(info.lang())?, confidence: info.confidence() as f32 })
    }

    /// Every turn's language from the event's field and what was detected per turn (one
    /// entry per turn, in order; all None when `detects` said no).
    pub fn resolve(&self, event_language: Option<&str>, detected: &[Option<Detection>]) -> ConversationLanguages {
        let event = event_code(event_language);
        if let (true, Some(event)) = (self.trust_event, &event) {
            let turn = TurnLanguage { code: event.clone(), confidence: 1.0, source: LanguageSource::Event };
            return ConversationLanguages { turns: vec![Some(turn); detected.len()], conversation: Some(event.clone()) };
        }
        let majority = majority(detected);
        let turns = detected
            .iter()
            .map(|d| match (d, &majority) {
                (Some(d), _) => Some(TurnLanguage { code: d.code.into(), confidence: d.confidence, source: LanguageSource::Detected }),
                (None, Some(m)) => Some(TurnLanguage { code: m.code.into(), confidence: m.share, source: LanguageSource::Inherited }),
                (None, None) => {
                    event.clone().map(|code| TurnLanguage { code, confidence: 1.0, source: LanguageSource::Event })
                }
            })
            .collect();
        ConversationLanguages { turns, conversation: majority.map(|m| m.code.to_string()).or(event) }
    }
}

/// The language most detected turns are in.
struct Majority {
    code: &'static str,
    /// Its share of the detected turns.
    share: f32,
}

/// Most turns; a tie goes to the larger summed confidence, then to the language seen first.
fn majority(detected: &[Option<Detection>]) -> Option<Majority> {
    let mut tally: Vec<(&'static str, usize, f32)> = Vec::new();
    for d in detected.iter().flatten() {
        match tally.iter_mut().find(|(code, _, _)| *code == d.code) {
            Some(t) => {
                t.1 += 1;
                t.2 += d.confidence;
            }
            None => tally.push((d.code, 1, d.confidence)),
        }
    }
    let total: usize = tally.iter().map(|t| t.1).sum();
    // max_by keeps the last of equals: walk in reverse so the first seen wins a full tie
    let (code, count, _) = tally.into_iter().rev().max_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)))?;
    Some(Majority { code, share: count as f32 / total as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LanguageConfig {
        LanguageConfig::default()
    }

    fn languages(cfg: LanguageConfig) -> Languages {
        Languages::new(&cfg).unwrap()
    }

    fn run(l: &Languages, event: Option<&str>, texts: &[&str]) -> ConversationLanguages {
        let detected: Vec<Option<Detection>> =
            texts.iter().map(|t| if l.detects(event) { l.detect(t) } else { None }).collect();
        l.resolve(event, &detected)
    }

    const FR: &str = "Bonjour, je voudrais savoir où en est ma commande passée la semaine dernière.";
    const EN: &str = "Hello, I would like to know where my order from last week is at the moment.";
    const DE: &str = "Guten Tag, ich möchte wissen, wo meine Bestellung von letzter Woche gerade ist.";

    #[test]
    fn each_turn_gets_the_language_of_its_own_text() {
        let l = languages(config());
        let out = run(&l, None, &[FR, EN, DE, FR]);
        let codes: Vec<&str> = out.turns.iter().map(|t| t.as_ref().unwrap().code.as_str()).collect();
        assert_eq!(codes, ["fr", "en", "de", "fr"]);
        assert!(out.turns.iter().flatten().all(|t| t.source == LanguageSource::Detected && t.confidence >= 0.5));
        assert_eq!(out.conversation.as_deref(), Some("fr"), "the majority");
    }

    #[test]
    fn a_turn_too_short_to_tell_inherits_the_majority() {
        let l = languages(config());
        let out = run(&l, None, &[DE, "ok", DE, EN]);
        let short = out.turns[1].as_ref().unwrap();
        assert_eq!((short.code.as_str(), short.source), ("de", LanguageSource::Inherited));
        assert!((short.confidence - 2.0 / 3.0).abs() < 1e-6, "two of three detected turns: {}", short.confidence);
        assert_eq!(out.conversation.as_deref(), Some("de"));
    }

    #[test]
    fn a_trusted_event_language_wins_over_the_text_and_an_untrusted_one_does_not() {
        // a field that names no language is not trusted: the turns are detected
        let blank = run(&languages(config()), Some("-FR"), &[EN]);
        assert_eq!(blank.turns[0].as_ref().map(|t| (t.code.as_str(), t.source)), Some(("en", LanguageSource::Detected)));
        let trusted = run(&languages(config()), Some("fr-FR"), &[EN, "ok"]);
        assert!(trusted.turns.iter().flatten().all(|t| t.code == "fr" && t.source == LanguageSource::Event));
        assert_eq!(trusted.turns.len(), 2);
        assert_eq!(trusted.conversation.as_deref(), Some("fr"));

        let untrusted = run(&languages(LanguageConfig { trust_event: false, ..config() }), Some("fr"), &[EN, "ok"]);
        let t: Vec<(&str, LanguageSource)> =
            untrusted.turns.iter().flatten().map(|t| (t.code.as_str(), t.source)).collect();
        assert_eq!(t, [("en", LanguageSource::Detected), ("en", LanguageSource::Inherited)]);
        assert_eq!(untrusted.conversation.as_deref(), Some("en"));

        // nothing detectable: the event's language, even untrusted, is what is known
        let nothing = run(&languages(LanguageConfig { trust_event: false, ..config() }), Some("fr"), &["ok", "oui"]);
        assert!(nothing.turns.iter().flatten().all(|t| t.code == "fr" && t.source == LanguageSource::Event));
        assert_eq!(nothing.turns.iter().flatten().count(), 2);
    }

    #[test]
    fn with_nothing_to_tell_a_turn_has_no_language() {
        let out = run(&languages(config()), None, &["ok", "merci"]);
        assert_eq!(out.turns, [None, None]);
        assert_eq!(out.conversation, None);
        let off = run(&languages(LanguageConfig { detect: false, ..config() }), None, &[FR]);
        assert_eq!(off.turns, [None]);
    }

    #[test]
    fn a_restricted_candidate_set_is_all_detection_chooses_from() {
        let l = languages(LanguageConfig { languages: vec!["en".into(), "de".into()], ..config() });
        let d = l.detect(DE).unwrap();
        assert_eq!(d.code, "de");
        // French text can only come out as one of the candidates, or not at all
        assert!(l.detect(FR).is_none_or(|d| d.code == "en" || d.code == "de"));
    }

    #[test]
    fn ties_go_to_confidence_then_to_the_first_seen() {
        let d = |code, confidence| Some(Detection { code, confidence });
        assert_eq!(majority(&[d("fr", 0.6), d("en", 0.9)]).unwrap().code, "en");
        assert_eq!(majority(&[d("fr", 0.7), d("en", 0.7)]).unwrap().code, "fr");
        assert_eq!(majority(&[d("fr", 0.7), d("en", 0.9), d("fr", 0.6)]).unwrap().code, "fr");
        assert!(majority(&[None, None]).is_none());
    }

    #[test]
    fn unknown_or_too_few_languages_are_clear_errors() {
        let err = |languages: Vec<&str>| {
            Languages::new(&LanguageConfig { languages: languages.into_iter().map(String::from).collect(), ..config() })
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let unknown = err(vec!["fr", "xx"]);
        assert!(unknown.contains("\"xx\" is no language this build detects") && unknown.contains("en, es"), "{unknown}");
        assert!(err(vec!["fr"]).contains("at least two candidates"));
        assert!(err(vec!["fr", "FR"]).contains("twice"));
        assert_eq!(normalize("pt_BR"), "pt");
        assert!(known().contains(&"lv") && known().contains(&"zh"), "{:?}", known());
    }
}
