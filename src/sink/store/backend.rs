//! Picks the configured backend (`qdrant.backend`): above both, so the interface they implement
//! does not depend on them.

use std::sync::Arc;

use super::optimizer::OptimizeSchedule;
use super::{StoreError, VectorStore, edge, remote};
use crate::config::{QdrantConfig, StoreBackend};

/// Opens the configured backend (no collection is touched yet).
pub fn open(cfg: &QdrantConfig) -> Result<Arc<dyn VectorStore>, StoreError> {
    Ok(match cfg.backend {
        StoreBackend::Edge => {
            let schedule = OptimizeSchedule {
                every: cfg.edge_optimize_every_points,
                idle: std::time::Duration::from_millis(cfg.edge_optimize_idle_ms),
                max_deferred: cfg.edge_optimize_max_deferred_points,
            };
            Arc::new(edge::EdgeStore::new(cfg.data_dir.join(&cfg.collection), schedule).with_min_free_bytes(cfg.edge_min_free_bytes))
        }
        StoreBackend::Qdrant => Arc::new(remote::RemoteStore::connect(cfg)?),
    })
}
