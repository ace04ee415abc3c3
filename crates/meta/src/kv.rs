//! The key-value view the state machine's logic runs on: reads from a base (the RocksDB state
//! column family, or a `BTreeMap` in unit tests) through an overlay of this batch's writes,
//! so that a command sees its own writes and the batch commits atomically.

use std::collections::BTreeMap;

/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Read access to committed state.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// Keys with `prefix` strictly after `after` (or from the start), in order, at most `limit`.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, String>;
}

impl KvRead for BTreeMap<Vec<u8>, Vec<u8>> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(BTreeMap::get(self, key).cloned())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, String> {
        let start = after.unwrap_or(prefix).to_vec();
        Ok(self
            .range(start..)
            .filter(|(k, _)| Some(k.as_slice()) != after)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// The writes of one batch over a base.
pub struct Overlay<'a, B: KvRead> {
    base: &'a B,
    pub(crate) changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a, B: KvRead> Overlay<'a, B> {
    pub fn new(base: &'a B) -> Self {
        Overlay {
            base,
            changes: BTreeMap::new(),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.changes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.changes.insert(key, None);
    }

    /// The batch's writes, in key order (`None` deletes).
    pub fn into_changes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.changes
    }
}

impl<B: KvRead> KvRead for Overlay<'_, B> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, String> {
        // Read enough of the base to survive deletions in the overlay, then merge.
        let deleted = self
            .changes
            .iter()
            .filter(|(k, v)| k.starts_with(prefix) && v.is_none())
            .count();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .base
            .scan(prefix, after, limit.saturating_add(deleted))?
            .into_iter()
            .collect();
        let start = after.unwrap_or(prefix).to_vec();
        for (k, v) in self.changes.range(start..) {
            if !k.starts_with(prefix) {
                break;
            }
            if Some(k.as_slice()) == after {
                continue;
            }
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}
