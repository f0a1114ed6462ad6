//! The batch stage: forms micro-batches of the messages the source queued.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::stage::Flight;
use crate::source::InboundMessage;
use crate::telemetry;

/// The batch stage: forms micro-batches of up to `max` messages. A batch takes what is already
/// queued and leaves at once while fewer than `room` batches are in flight (an idle worker
/// handles a lone conversation immediately and the models always have work queued, like
/// text-embeddings-inference forming the next batch while the model runs); otherwise it keeps
/// filling until it is full or a batch in flight ends. `linger` > 0 holds every batch that
/// long for more messages first.
pub async fn form_batches(
    mut rx: mpsc::Receiver<InboundMessage>,
    tx: mpsc::Sender<Vec<InboundMessage>>,
    flight: Arc<Flight>,
    max: usize,
    room: usize,
    linger: Duration,
) {
    loop {
        // the source's leaving (or the pipeline's giving up on it) ends the wait too
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = flight.abandoned() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let linger_until = Instant::now() + linger;
        let mut open = true;
        loop {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let lingering = open && Instant::now() < linger_until;
            if batch.len() >= max || !open || (flight.count() < room && !lingering) {
                break;
            }
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => open = false,
                },
                _ = flight.ended.notified() => {}
                _ = tokio::time::sleep_until(linger_until), if lingering => {}
                _ = flight.abandoned() => open = false,
            }
        }
        metrics::gauge!(telemetry::QUEUE_DEPTH).set(rx.len() as f64);
        if !open || rx.is_closed() {
            // the source is gone (it committed what was complete and left the group): nothing
            // of this batch, nor of what is still queued, can be completed any more
            break;
        }
        flight.started();
        if tx.send(batch).await.is_err() {
            break;
        }
    }
    flight.abandon(); // also wakes a waiter on `ended`
}
