//! The preparation stage: everything about a micro-batch that needs only the CPU — decode,
//! validate, chunk, count tokens, BM25 weights, point ids — and the models' inputs, each turn
//! tokenized once per model here (chunks carry the embedding model's token ids, NER gets its
//! encodings with character offsets, sentiment its ids), so the model threads only pad, upload
//! and run. Messages of a batch are prepared in parallel on rayon's pool, in input order.

use std::sync::Arc;

use anyhow::{Context, Result};
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::stage::{Busy, Flight, STAGE_PREPARE, record_depth};
use super::text::{TextEnricher, TextEnriched};
use crate::codec::RecordCodec;
use crate::config::{Config, ModelList, TombstoneScope};
use crate::event::{Conversation, EnrichedConversation, EventLimits, SourceRef, ValidationError};
use crate::infer::ModelFolder;
use crate::infer::model::NerInput;
use crate::infer::tokenize::ModelTokenizer;
use crate::routing::{Route, Routes};
use super::message::{Decided, Message, Tombstone};
use crate::fault::RejectClass;
use crate::source::{InboundMessage, SharedSource};

/// The record header naming a tombstone's tenant (a null value has no body to say it).
pub const TENANT_HEADER: &str = "tenant";

/// A valid conversation after the prepare stage: its text enrichment and the inputs of each
/// configured model (kept until the models' outputs are applied, so the message can run again
/// alone).
pub struct Valid {
    pub conversation: Conversation,
    pub event: EnrichedConversation,
    pub inputs: ModelInputs,
}

/// Model inputs of one conversation, tokenized already. Empty for a model that is not configured.
#[derive(Debug, Default)]
pub struct ModelInputs {
    /// One id sequence (special tokens, document prefix, chunk ids) per chunk, in event order.
    pub embedding: Vec<Vec<i64>>,
    /// One encoding per routed turn (shared with the NER job it is submitted in).
    pub ner: RoutedInputs<Arc<NerInput>>,
    /// One id sequence per routed turn.
    pub sentiment: RoutedInputs<Vec<i64>>,
}

/// One task's inputs of a conversation, each turn routed by its language (`routing`).
#[derive(Debug)]
pub struct RoutedInputs<T> {
    /// Per turn: the task's model it goes to, or why none does.
    pub routes: Vec<Route>,
    /// Per model of the task (the index in `routes`): the inputs of its turns, in turn order.
    pub per_model: Vec<Vec<T>>,
}

impl<T> Default for RoutedInputs<T> {
    fn default() -> Self {
        Self { routes: vec![], per_model: vec![] }
    }
}

impl<T> RoutedInputs<T> {
    /// How many inputs model `i` of the task has from this conversation.
    pub fn count(&self, i: usize) -> usize {
        self.per_model.get(i).map_or(0, Vec::len)
    }
}

/// A routed task's tokenizers, one per model, and its routes.
struct RoutedTokenizers {
    routes: Routes,
    tokenizers: Vec<ModelTokenizer>,
}

impl RoutedTokenizers {
    /// Routes each turn by its resolved language and tokenizes it with its model's tokenizer
    /// (turns in parallel on rayon's pool: a long conversation alone uses every core).
    fn inputs<T: Send>(
        &self,
        turns: &[crate::event::Turn],
        enriched: &[crate::event::EnrichedTurn],
        encode: impl Fn(&ModelTokenizer, &str) -> Result<T> + Sync,
    ) -> Result<RoutedInputs<T>> {
        let routes: Vec<Route> = enriched.iter().map(|t| self.routes.route(t.language.as_deref())).collect();
        let encoded: Vec<Option<T>> = turns
            .par_iter()
            .zip(routes.par_iter())
            .map(|(turn, route)| match route {
                Route::Model(i) => encode(&self.tokenizers[*i], &turn.text).map(Some),
                Route::Skipped(_) => Ok(None),
            })
            .collect::<Result<_>>()?;
        let mut per_model: Vec<Vec<T>> = (0..self.tokenizers.len()).map(|_| Vec::new()).collect();
        for (route, input) in routes.iter().zip(encoded) {
            if let (Route::Model(i), Some(input)) = (route, input) {
                per_model[*i].push(input);
            }
        }
        Ok(RoutedInputs { routes, per_model })
    }
}

/// One input message after the prepare stage.
pub type Prepared = Message<Valid>;

/// The embedding model's tokenizer and the ids of its document prefix.
struct EmbeddingTokens {
    tokenizer: ModelTokenizer,
    leading: Vec<i64>,
}

pub struct Preparer {
    input_codec: RecordCodec<Conversation>,
    limits: EventLimits,
    max_event_bytes: usize,
    tombstone_scope: TombstoneScope,
    text: TextEnricher,
    embedding: Option<EmbeddingTokens>,
    ner: Option<RoutedTokenizers>,
    sentiment: Option<RoutedTokenizers>,
    /// Whose tokens `token_count` counts (for `convoflow check`).
    pub chunk_tokens: String,
}

/// What a null-valued record deletes, or why it cannot say.
fn tombstone(msg: &InboundMessage, scope: TombstoneScope) -> Result<Tombstone, String> {
    let key = msg.key.as_deref().ok_or("tombstone (null value) without a key: no conversation to delete")?;
    let conversation_id =
        std::str::from_utf8(key).map_err(|_| "tombstone key is not UTF-8: no conversation id".to_string())?.to_string();
    if conversation_id.is_empty() || conversation_id.contains('\0') {
        return Err("tombstone key is empty or contains NUL: no conversation id".into());
    }
    let tenant = match msg.headers.iter().rev().find(|h| h.key == TENANT_HEADER) {
        Some(h) => Some(
            std::str::from_utf8(h.value.as_deref().unwrap_or_default())
                .map_err(|_| format!("tombstone header {TENANT_HEADER} is not UTF-8"))?
                .to_string(),
        ),
        None => match scope {
            TombstoneScope::AllTenants => None,
            TombstoneScope::HeaderTenant => Some(String::new()),
        },
    };
    if tenant.as_deref().is_some_and(|t| t.contains('\0')) {
        return Err(format!("tombstone header {TENANT_HEADER} contains NUL"));
    }
    Ok(Tombstone { tenant, conversation_id, matched: None })
}

impl Preparer {
    /// The model-free part (chunking, token counts, BM25, point ids).
    pub fn text(&self) -> &TextEnricher {
        &self.text
    }

    /// The configured codec, chunker and model tokenizers (read from the model folders; the
    /// models themselves are not needed here).
    pub fn new(cfg: &Config) -> Result<Self> {
        // no single Avro allocation (a string, bytes, a block) larger than an event may be: a
        // few bytes claiming a huge length are refused instead of allocated (process-wide; the
        // first worker configured sets it)
        apache_avro::util::max_allocation_bytes(cfg.pipeline.max_event_bytes.max(1 << 20));
        let m = &cfg.models;
        let tokenizer = |c: &crate::config::ModelConfig| -> Result<ModelTokenizer> {
            let folder = ModelFolder::open(&c.path).with_context(|| format!("the model {}", c.name))?;
            ModelTokenizer::load(&folder).with_context(|| format!("the tokenizer of {}", c.name))
        };
        let routed = |task: &str, list: &ModelList| -> Result<Option<RoutedTokenizers>> {
            if list.is_empty() {
                return Ok(None);
            }
            let routes = Routes::new(task, &list.0)?;
            let lang = &cfg.pipeline.language;
            if !routes.has_fallback() && !lang.detect {
                tracing::warn!(
                    task,
                    "pipeline.language.detect is off and no {task} model takes \"*\": turns of events without a language field \
                     get no {task} (skipped: unknown-language)"
                );
            }
            let never: Vec<&str> = routes
                .named_languages()
                .into_iter()
                .filter(|c| lang.detect && !lang.languages.is_empty() && !lang.languages.iter().any(|l| crate::language::normalize(l) == *c))
                .collect();
            if !never.is_empty() {
                tracing::warn!(
                    task,
                    languages = %never.join(","),
                    "models.{task} names languages that pipeline.language.languages leaves out: only events that say so reach them"
                );
            }
            Ok(Some(RoutedTokenizers { routes, tokenizers: list.iter().map(tokenizer).collect::<Result<_>>()? }))
        };
        let embedding = match &m.embedding {
            Some(c) => {
                Routes::covering_all("embedding", c)?;
                let tokenizer = tokenizer(c)?;
                let leading = tokenizer.leading_ids(&c.document_prefix)?;
                Some(EmbeddingTokens { tokenizer, leading })
            }
            None => None,
        };
        let text = super::text::build_text_enricher(cfg, embedding.as_ref().map(|e| (&e.tokenizer, e.leading.len())))?;
        let chunk_tokens = match (&m.embedding, &cfg.pipeline.chunk.tokenizer) {
            (Some(e), _) => format!("the embedding model's ({})", e.name),
            (None, Some(path)) => path.display().to_string(),
            (None, None) => "built-in word-level".into(),
        };
        Ok(Self {
            chunk_tokens,
            input_codec: crate::codec::factory::input_codec(&cfg.codec)?,
            limits: EventLimits {
                max_turn_bytes: cfg.pipeline.max_turn_bytes,
                max_turns: cfg.pipeline.max_turns_per_event,
                max_id_bytes: cfg.pipeline.max_id_bytes,
            },
            max_event_bytes: cfg.pipeline.max_event_bytes,
            tombstone_scope: cfg.pipeline.tombstone_scope,
            text,
            embedding,
            ner: routed("ner", &m.ner)?,
            sentiment: routed("sentiment", &m.sentiment)?,
        })
    }

    /// Stop waiting for the Schema Registry: the worker is stopping.
    pub fn interrupt(&self) {
        self.input_codec.interrupt();
    }

    /// Prepares a micro-batch, messages in parallel, output in input order.
    pub fn prepare(&self, batch: Vec<InboundMessage>) -> Vec<Prepared> {
        batch
            .into_par_iter()
            .map(|msg| {
                let decided = self.decide(&msg);
                Prepared { msg, decided }
            })
            .collect()
    }

    /// Prepares one message.
    pub fn decide(&self, msg: &InboundMessage) -> Decided<Valid> {
        let Some(payload) = &msg.payload else {
            return match tombstone(msg, self.tombstone_scope) {
                Ok(t) => Decided::Tombstone(t),
                Err(message) => Decided::rejected(RejectClass::Validation, message),
            };
        };
        if payload.len() > self.max_event_bytes {
            let e = ValidationError::EventTooLarge { bytes: payload.len(), limit: self.max_event_bytes };
            return Decided::rejected(RejectClass::Validation, e.to_string());
        }
        let conversation = match self.input_codec.decode(payload) {
            Ok(c) => c,
            Err(e) => return Decided::Failed(e.fault()),
        };
        let checked = conversation.validate(&self.limits).and_then(|()| match &msg.key {
            Some(key) if key.as_slice() != conversation.conversation_id.as_bytes() => Err(ValidationError::KeyMismatch {
                key: String::from_utf8_lossy(key).into_owned(),
                conversation_id: conversation.conversation_id.clone(),
            }),
            _ => Ok(()),
        });
        if let Err(e) = checked {
            return Decided::rejected(RejectClass::Validation, e.to_string());
        }
        match self.enrich(&conversation, source_ref(msg)) {
            Ok((event, inputs)) => Decided::Valid(Box::new(Valid { conversation, event, inputs })),
            Err(e) => Decided::rejected(RejectClass::Enrichment, format!("{e:#}")),
        }
    }

    fn enrich(&self, conversation: &Conversation, source: SourceRef) -> Result<(EnrichedConversation, ModelInputs)> {
        let TextEnriched { event, chunked } = self.text.enrich(conversation, source)?;
        let mut inputs = ModelInputs::default();
        if let Some(e) = &self.embedding {
            for turn in &chunked {
                for chunk in &turn.chunks {
                    inputs.embedding.push(e.tokenizer.wrap(&e.leading, &turn.ids[chunk.tokens.clone()]));
                }
            }
        }
        if let Some(r) = &self.ner {
            inputs.ner = r.inputs(&conversation.turns, &event.turns, |t, text| {
                Ok(Arc::new(NerInput { text: text.to_string(), encoding: t.encode_untruncated_one(text)? }))
            })?;
        }
        if let Some(r) = &self.sentiment {
            inputs.sentiment = r.inputs(&conversation.turns, &event.turns, |t, text| Ok(t.encode_ids_one(text)?))?;
        }
        Ok((event, inputs))
    }
}

pub fn source_ref(msg: &InboundMessage) -> SourceRef {
    SourceRef { topic: msg.tp.topic.to_string(), partition: msg.tp.partition, offset: msg.offset }
}

/// The prepare stage: up to `workers` micro-batches at once on blocking threads (each spreads
/// its messages over rayon's pool), passed on in input order.
pub async fn prepare_batches(
    mut rx: mpsc::Receiver<Vec<InboundMessage>>,
    tx: mpsc::Sender<Vec<Prepared>>,
    preparer: Arc<Preparer>,
    shared: Arc<SharedSource>,
    flight: Arc<Flight>,
    workers: usize,
) {
    use futures::StreamExt;
    let batches = futures::stream::poll_fn(move |cx| {
        let next = rx.poll_recv(cx);
        record_depth(STAGE_PREPARE, rx.len());
        next
    })
    .map(|batch: Vec<InboundMessage>| {
        let (preparer, shared, flight) = (preparer.clone(), shared.clone(), flight.clone());
        tokio::task::spawn_blocking(move || {
            if flight.is_abandoned() {
                return vec![];
            }
            let _busy = Busy::start(STAGE_PREPARE);
            // messages of partitions revoked meanwhile are dropped: the next owner re-reads them
            let current: Vec<InboundMessage> = batch.into_iter().filter(|m| shared.is_current(&m.tp, m.generation)).collect();
            preparer.prepare(current)
        })
    })
    .buffered(workers);
    let mut batches = std::pin::pin!(batches);
    while let Some(prepared) = batches.next().await {
        let prepared = prepared.expect("preparation does not panic");
        if prepared.is_empty() {
            flight.ended(); // every message was revoked meanwhile, or the source is gone
        } else if tx.send(prepared).await.is_err() {
            return;
        }
    }
}
