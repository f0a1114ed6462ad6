//! One value per input message, through every stage: the message as read and what its stage
//! made of it. The value of a valid conversation changes type from stage to stage —
//! `prepare::Valid` (its text enrichment and model inputs) → `infer::Enriched` (the models'
//! outputs applied) → `emit::Written` (encoded, its points acknowledged by the store) — so a
//! stage cannot be handed what an earlier stage has not finished.

use crate::fault::{Fault, RejectClass, Rejection};
use crate::source::InboundMessage;

/// An input message at one stage: `V` is that stage's value of a valid conversation.
pub struct Message<V> {
    pub msg: InboundMessage,
    pub decided: Decided<V>,
}

/// What became of one input message.
pub enum Decided<V> {
    /// A null value: the conversation's points are deleted.
    Tombstone(Tombstone),
    Valid(Box<V>),
    /// `Fault::Data`: dead-lettered in its place. `Fault::Machine`: could not be decided because
    /// a dependency (the Schema Registry) did not answer before the worker began to stop:
    /// neither dead-lettered nor completed, so it is re-read.
    Failed(Fault),
}

impl<V> Decided<V> {
    pub fn rejected(class: RejectClass, message: impl Into<String>) -> Self {
        Decided::Failed(Fault::data(class, message))
    }

    /// Why it is dead-lettered, if it is.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Decided::Failed(Fault::Data(r)) => Some(r),
            _ => None,
        }
    }

    /// Left unfinished for the machine's fault (neither dead-lettered nor completed).
    pub fn is_unfinished(&self) -> bool {
        matches!(self, Decided::Failed(Fault::Machine(_)))
    }

    pub fn valid(&self) -> Option<&V> {
        match self {
            Decided::Valid(v) => Some(v),
            _ => None,
        }
    }

    /// The same decision at the next stage: a valid conversation's value becomes what `next`
    /// makes of it (a `Fault::Data` dead-letters it there); a tombstone or a failure stays.
    pub fn then<W>(self, next: impl FnOnce(V) -> Result<W, Fault>) -> Decided<W> {
        match self {
            Decided::Valid(v) => match next(*v) {
                Ok(w) => Decided::Valid(Box::new(w)),
                Err(fault) => Decided::Failed(fault),
            },
            Decided::Tombstone(t) => Decided::Tombstone(t),
            Decided::Failed(fault) => Decided::Failed(fault),
        }
    }
}

impl<V> Message<V> {
    /// `Decided::then` for this message, which keeps its place.
    pub fn then<W>(self, next: impl FnOnce(V) -> Result<W, Fault>) -> Message<W> {
        Message { msg: self.msg, decided: self.decided.then(next) }
    }

    /// The next stage's value of a valid conversation, where a failure of `next` is not the
    /// message's but stops the batch (returned as the error).
    pub fn try_then<W, E>(self, next: impl FnOnce(V) -> Result<W, E>) -> Result<Message<W>, E> {
        let decided = match self.decided {
            Decided::Valid(v) => Decided::Valid(Box::new(next(*v)?)),
            Decided::Tombstone(t) => Decided::Tombstone(t),
            Decided::Failed(fault) => Decided::Failed(fault),
        };
        Ok(Message { msg: self.msg, decided })
    }
}

/// What a tombstone deletes: the points of `conversation_id` (its key) in `tenant` (its
/// `tenant` header; without one, every tenant's with `pipeline.tombstone_scope: all_tenants`,
/// the points written without a tenant with `header_tenant`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// None: every tenant.
    pub tenant: Option<String>,
    pub conversation_id: String,
    /// How many points it deleted, once the store stage ran it.
    pub matched: Option<u64>,
}
