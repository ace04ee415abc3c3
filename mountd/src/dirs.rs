//! Directory listings kept per open directory handle, so that the kernel's offsets into a
//! listing (its cookies) stay stable while it reads on: a read from offset 0 lists afresh.

use brickfs_proto::meta::Attr;
use fuser::FileType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One name of a directory listing; offsets into the listing are the kernel's cookies (1 is
/// ".", 2 is "..", then the entries in name order).
pub struct Listed {
    pub ino: u64,
    pub kind: FileType,
    pub name: String,
    /// With readdirplus.
    pub attr: Option<Attr>,
}

/// The listings of open directories.
#[derive(Default)]
pub struct Listings(Mutex<HashMap<u64, Arc<Vec<Listed>>>>);

impl Listings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Vec<Listed>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The listing to continue a read of directory handle `fh` at `offset` from: the one
    /// kept, unless the read starts over (offset 0) or wants attributes it lacks.
    pub fn resume(&self, fh: u64, offset: u64, plus: bool) -> Option<Arc<Vec<Listed>>> {
        let l = self.lock().get(&fh).cloned()?;
        (offset > 0 && (!plus || l.iter().all(|e| e.attr.is_some()))).then_some(l)
    }

    pub fn keep(&self, fh: u64, listing: Arc<Vec<Listed>>) {
        self.lock().insert(fh, listing);
    }

    pub fn forget(&self, fh: u64) {
        self.lock().remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, attr: bool) -> Listed {
        Listed {
            ino: 2,
            kind: FileType::RegularFile,
            name: name.into(),
            attr: attr.then(|| crate::handles::tests::attr(2, 0)),
        }
    }

    #[test]
    fn reads_resume_the_kept_listing_until_they_start_over() {
        let l = Listings::default();
        assert!(l.resume(1, 3, false).is_none(), "nothing kept");
        l.keep(1, Arc::new(vec![entry("a", false), entry("b", false)]));
        assert_eq!(l.resume(1, 1, false).unwrap().len(), 2);
        assert!(l.resume(1, 0, false).is_none(), "offset 0 lists afresh");
        assert!(
            l.resume(1, 1, true).is_none(),
            "a plus read needs attributes"
        );
        assert!(l.resume(2, 1, false).is_none(), "another handle");
        l.keep(1, Arc::new(vec![entry("a", true)]));
        assert!(l.resume(1, 1, true).is_some());
        l.forget(1);
        assert!(l.resume(1, 1, false).is_none());
    }
}
