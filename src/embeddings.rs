//! Prompt embeddings kept between runs: a least-recently-used cache, bounded in bytes, that several pipelines (one per
//! server worker) can share, keyed by model and prompts. A cached prompt skips CLIP and T5 and feeds the transformer
//! the same rows, so the pixels are the same.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use ndarray::ArrayD;

/// What identifies a prompt's embeddings: the model folder, the CLIP prompt and the T5 prompt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmbeddingKey {
    pub model: String,
    pub prompt: String,
    pub prompt_2: String,
}

/// One prompt's encoder outputs: the pooled CLIP row [1, D] and the T5 sequence [1, L, D].
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    pub pooled: ArrayD<f32>,
    pub txt: ArrayD<f32>,
}

impl PromptEmbedding {
    fn bytes(&self) -> usize {
        (self.pooled.len() + self.txt.len()) * std::mem::size_of::<f32>()
    }
}

/// Counters of an [`EmbeddingCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbeddingCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub budget: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A least-recently-used cache of prompt embeddings, bounded in bytes (tensors plus key text). Thread-safe,
/// so several pipelines (one per worker thread) can share one. An entry larger than the whole budget is
/// not kept.
#[derive(Debug)]
pub struct EmbeddingCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<EmbeddingKey, (Arc<PromptEmbedding>, u64, usize)>,
    /// Use tick -> key, oldest first.
    order: BTreeMap<u64, EmbeddingKey>,
    tick: u64,
    stats: EmbeddingCacheStats,
}

impl EmbeddingCache {
    pub fn new(budget_bytes: usize) -> EmbeddingCache {
        EmbeddingCache {
            budget: budget_bytes,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The embedding of `key`, marking it most recently used; counts a hit or a miss.
    pub fn get(&self, key: &EmbeddingKey) -> Option<Arc<PromptEmbedding>> {
        let mut guard = self.lock();
        let c = &mut *guard;
        c.tick += 1;
        let Some(entry) = c.map.get_mut(key) else {
            c.stats.misses += 1;
            return None;
        };
        let old = std::mem::replace(&mut entry.1, c.tick);
        c.order.remove(&old);
        c.order.insert(c.tick, key.clone());
        c.stats.hits += 1;
        Some(entry.0.clone())
    }

    /// Stores `emb` under `key`, evicting the least recently used entries until it fits the budget.
    pub fn insert(&self, key: EmbeddingKey, emb: Arc<PromptEmbedding>) {
        let size = emb.bytes() + key.model.len() + key.prompt.len() + key.prompt_2.len();
        if size > self.budget {
            return;
        }
        let mut c = self.lock();
        if let Some((_, old, old_size)) = c.map.remove(&key) {
            c.order.remove(&old);
            c.stats.bytes -= old_size;
        }
        while c.stats.bytes + size > self.budget {
            let Some((_, victim)) = c.order.pop_first() else {
                break;
            };
            if let Some((_, _, vsize)) = c.map.remove(&victim) {
                c.stats.bytes -= vsize;
                c.stats.evictions += 1;
            }
        }
        c.tick += 1;
        let tick = c.tick;
        c.order.insert(tick, key.clone());
        c.map.insert(key, (emb, tick, size));
        c.stats.bytes += size;
    }

    pub fn stats(&self) -> EmbeddingCacheStats {
        let c = self.lock();
        EmbeddingCacheStats {
            entries: c.map.len(),
            budget: self.budget,
            ..c.stats
        }
    }

    pub fn clear(&self) {
        let mut c = self.lock();
        c.map.clear();
        c.order.clear();
        c.stats.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emb(n: usize) -> Arc<PromptEmbedding> {
        Arc::new(PromptEmbedding {
            pooled: ArrayD::zeros(ndarray::IxDyn(&[1, n])),
            txt: ArrayD::zeros(ndarray::IxDyn(&[1, 1, n])),
        })
    }

    fn key(p: &str) -> EmbeddingKey {
        EmbeddingKey {
            model: "m".into(),
            prompt: p.into(),
            prompt_2: p.into(),
        }
    }

    #[test]
    fn embedding_cache_evicts_least_recently_used_within_its_budget() {
        // Each entry: 2 * 10 floats = 80 bytes + 3 bytes of key text.
        let cache = EmbeddingCache::new(200);
        cache.insert(key("a"), emb(10));
        cache.insert(key("b"), emb(10));
        assert_eq!(cache.stats().bytes, 166);
        assert!(cache.get(&key("a")).is_some()); // a is now the most recent
        cache.insert(key("c"), emb(10)); // evicts b
        assert!(cache.get(&key("b")).is_none());
        assert!(cache.get(&key("a")).is_some());
        assert!(cache.get(&key("c")).is_some());
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (2, 166, 1));
        assert_eq!((s.hits, s.misses), (3, 1));
        // Too large for the whole budget: not kept, nothing evicted.
        cache.insert(key("big"), emb(1000));
        assert!(cache.get(&key("big")).is_none());
        assert_eq!(cache.stats().entries, 2);
        // Re-inserting a key replaces it without double counting.
        cache.insert(key("a"), emb(10));
        assert_eq!(cache.stats().bytes, 166);
        cache.clear();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().bytes, 0);
    }
}
