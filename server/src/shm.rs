//! System shared memory, as Triton's extension defines it: a client on the
//! same host creates a POSIX shared-memory object (`/dev/shm/<key>`),
//! registers a window of it under a name, and then passes tensors by
//! reference (region, offset, byte size) instead of over the socket.
//!
//! A registered region is an open descriptor of the object and the window
//! `[offset, offset + byte_size)` in it. Inputs are read with `pread` and
//! outputs written with `pwrite`, never through a mapping: the client owns
//! the object and may shrink it (`ftruncate`) at any time, and touching a
//! mapped page past the object's end is a SIGBUS that would take the whole
//! server down (Triton maps, and has that flaw). With a descriptor a
//! shrunk object is a short read, an error for that request alone. The
//! copy costs nothing extra on the output side and one copy on the input
//! side, which the transport benchmark measures. Requests hold an `Arc` to
//! the region, so unregistering only removes the name: a request already
//! using the region finishes with the descriptor still open.
//!
//! As with Triton, a client that rewrites a region before its response
//! arrives gets what it wrote.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where POSIX shared-memory objects live on Linux (`shm_open` opens
/// `/dev/shm/<name>`).
pub const SHM_DIR: &str = "/dev/shm";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShmError {
    #[error("shared memory region {0:?} is not registered")]
    UnknownRegion(String),
    #[error("shared memory region {0:?} is already registered")]
    AlreadyRegistered(String),
    #[error("shared memory key {key:?}: no object {path} (create it with shm_open first)")]
    MissingKey { key: String, path: String },
    #[error("shared memory key {0:?} is not a valid POSIX shared-memory name")]
    BadKey(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("shared memory key {key:?}: {message}")]
    Map { key: String, message: String },
    /// The client shrank or emptied the object after registering it.
    #[error("{0}")]
    Shrunk(String),
    /// Registration past the configured number or size of regions.
    #[error("{0}")]
    Limit(String),
}

/// How an error reads to a client: which of the API's kinds it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmErrorClass {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Internal,
}

impl ShmError {
    pub fn class(&self) -> ShmErrorClass {
        match self {
            ShmError::UnknownRegion(_) | ShmError::MissingKey { .. } => ShmErrorClass::NotFound,
            ShmError::AlreadyRegistered(_) => ShmErrorClass::AlreadyExists,
            ShmError::BadKey(_)
            | ShmError::OutOfRange(_)
            | ShmError::Shrunk(_)
            | ShmError::Limit(_) => ShmErrorClass::InvalidArgument,
            ShmError::Map { .. } => ShmErrorClass::Internal,
        }
    }
}

/// What status reports of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// One registered window of a shared-memory object, read and written
/// through its descriptor.
struct Region {
    status: RegionStatus,
    file: std::fs::File,
}

impl Region {
    /// Checks `[offset, offset + len)` lies inside the region.
    fn check(&self, what: &str, offset: u64, len: u64) -> Result<u64, ShmError> {
        let size = self.status.byte_size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(self.status.offset + offset),
            _ => Err(ShmError::OutOfRange(format!(
                "{what}: offset {offset} + byte size {len} exceeds shared memory region {:?} of {size} bytes",
                self.status.name
            ))),
        }
    }
}

impl Region {
    /// A failed read or write: the object shrank under us (a short read,
    /// or a length below the window now), or another I/O error.
    fn io_error(&self, what: &str, at: u64, len: u64, e: std::io::Error) -> ShmError {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if e.kind() == std::io::ErrorKind::UnexpectedEof || at + len > now {
            ShmError::Shrunk(format!(
                "{what}: shared memory region {:?} shrank: its object {} now has {now} bytes, \
                 the tensor needs bytes {at}..{}",
                self.status.name,
                self.status.key,
                at + len
            ))
        } else {
            ShmError::Map {
                key: self.status.key.clone(),
                message: format!("{what}: {e}"),
            }
        }
    }
}

/// The registry of regions, shared by the gRPC and REST front ends so a
/// region registered over one is usable over the other.
pub struct SharedMemory {
    regions: Mutex<BTreeMap<String, Arc<Region>>>,
    dir: Option<PathBuf>,
    max_regions: usize,
    max_bytes: u64,
}

impl Default for SharedMemory {
    fn default() -> Self {
        Self {
            regions: Mutex::default(),
            dir: None,
            max_regions: usize::MAX,
            max_bytes: u64::MAX,
        }
    }
}

/// Validates a client key (`/name` or `name`) and returns the file name.
fn object_name(key: &str) -> Result<&str, ShmError> {
    let name = key.strip_prefix('/').unwrap_or(key);
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(ShmError::BadKey(key.to_string()));
    }
    Ok(name)
}

impl SharedMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose keys name files in `dir` instead of `/dev/shm`
    /// (tests on machines without a writable `/dev/shm`).
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
            ..Self::default()
        }
    }

    /// Bounds the regions registered at once: their number and their
    /// bytes together (`--shm-max-regions`, `--shm-max-bytes`).
    pub fn with_limits(mut self, max_regions: usize, max_bytes: u64) -> Self {
        self.max_regions = max_regions;
        self.max_bytes = max_bytes;
        self
    }

    fn dir(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new(SHM_DIR))
    }

    /// Maps `[offset, offset + byte_size)` of the object `key` under `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), ShmError> {
        if name.is_empty() {
            return Err(ShmError::OutOfRange(
                "a shared memory region needs a non-empty name".into(),
            ));
        }
        if self.regions.lock().contains_key(name) {
            return Err(ShmError::AlreadyRegistered(name.to_string()));
        }
        let path = self.dir().join(object_name(key)?);
        let map_err = |e: std::io::Error| ShmError::Map {
            key: key.to_string(),
            message: e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ShmError::MissingKey {
                    key: key.to_string(),
                    path: path.display().to_string(),
                },
                _ => map_err(e),
            })?;
        let file_len = file.metadata().map_err(map_err)?.len();
        if byte_size == 0 {
            return Err(ShmError::OutOfRange(format!(
                "shared memory region {name:?}: byte_size must be positive"
            )));
        }
        // Touching a mapped page past the end of the object would be a
        // SIGBUS, so the window must lie inside the object as it is now.
        if offset
            .checked_add(byte_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(ShmError::OutOfRange(format!(
                "shared memory region {name:?}: offset {offset} + byte_size {byte_size} exceeds \
                 the {file_len} bytes of {}",
                path.display()
            )));
        }
        usize::try_from(byte_size).map_err(|_| {
            ShmError::OutOfRange(format!("byte_size {byte_size} does not fit this machine"))
        })?;
        let region = Arc::new(Region {
            status: RegionStatus {
                name: name.to_string(),
                key: key.to_string(),
                offset,
                byte_size,
            },
            file,
        });
        // Checked again under the lock: another register may have raced us.
        let mut regions = self.regions.lock();
        if regions.contains_key(name) {
            return Err(ShmError::AlreadyRegistered(name.to_string()));
        }
        if regions.len() >= self.max_regions {
            return Err(ShmError::Limit(format!(
                "shared memory region {name:?}: {} regions are registered, the most allowed \
                 (--shm-max-regions); unregister one first",
                regions.len()
            )));
        }
        let total: u64 = regions.values().map(|r| r.status.byte_size).sum();
        if total.saturating_add(byte_size) > self.max_bytes {
            return Err(ShmError::Limit(format!(
                "shared memory region {name:?}: {byte_size} bytes more than the {total} registered \
                 would pass --shm-max-bytes ({})",
                self.max_bytes
            )));
        }
        regions.insert(name.to_string(), region);
        Ok(())
    }

    /// Forgets `name` (every region when `None`). Requests already using
    /// a region keep its mapping until they finish. Unknown names are not
    /// an error, as in Triton: unregistering is idempotent.
    pub fn unregister(&self, name: Option<&str>) {
        let mut regions = self.regions.lock();
        match name {
            Some(n) => {
                regions.remove(n);
            }
            None => regions.clear(),
        }
    }

    /// The status of `name`, or of every region when `None`.
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>, ShmError> {
        let regions = self.regions.lock();
        match name {
            Some(n) => regions
                .get(n)
                .map(|r| vec![r.status.clone()])
                .ok_or_else(|| ShmError::UnknownRegion(n.to_string())),
            None => Ok(regions.values().map(|r| r.status.clone()).collect()),
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Region>, ShmError> {
        self.regions
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ShmError::UnknownRegion(name.to_string()))
    }

    /// The bytes of an input, read from the object now.
    pub fn input(&self, tensor: &str, r: &ShmRef) -> Result<Bytes, ShmError> {
        let region = self.get(&r.region)?;
        let at = region.check(&format!("input {tensor:?}"), r.offset, r.byte_size)?;
        let len = usize::try_from(r.byte_size).map_err(|_| {
            ShmError::OutOfRange(format!(
                "input {tensor:?}: byte size {} does not fit",
                r.byte_size
            ))
        })?;
        let mut buf = vec![0u8; len];
        region
            .file
            .read_exact_at(&mut buf, at)
            .map_err(|e| region.io_error(&format!("input {tensor:?}"), at, r.byte_size, e))?;
        Ok(Bytes::from(buf))
    }

    /// Where an output goes, checked and held before the request runs.
    pub fn output(&self, tensor: &str, r: &ShmRef) -> Result<OutputTarget, ShmError> {
        let region = self.get(&r.region)?;
        let start = region.check(&format!("output {tensor:?}"), r.offset, r.byte_size)?;
        Ok(OutputTarget {
            region,
            start,
            reference: r.clone(),
        })
    }
}

/// A tensor's place in a region, as the request parameters
/// `shared_memory_region`, `shared_memory_offset` and
/// `shared_memory_byte_size` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// An output's window in a region, held for the whole request.
pub struct OutputTarget {
    region: Arc<Region>,
    /// Where the window starts in the object.
    start: u64,
    pub reference: ShmRef,
}

impl OutputTarget {
    /// Copies `data` into the window; refuses data that does not fit.
    pub fn write(&self, tensor: &str, data: &[u8]) -> Result<(), ShmError> {
        if data.len() as u64 > self.reference.byte_size {
            return Err(ShmError::OutOfRange(format!(
                "output {tensor:?} has {} bytes, more than the {} bytes given in shared memory region {:?}",
                data.len(),
                self.reference.byte_size,
                self.reference.region
            )));
        }
        // pwrite past the end would grow an object the client shrank:
        // refuse instead. (A shrink between this check and the write only
        // grows it back; nothing is ever touched through a mapping.)
        let len = data.len() as u64;
        let now = self.region.file.metadata().map(|m| m.len()).unwrap_or(0);
        if self.start + len > now {
            return Err(self.region.io_error(
                &format!("output {tensor:?}"),
                self.start,
                len,
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        self.region
            .file
            .write_all_at(data, self.start)
            .map_err(|e| {
                self.region
                    .io_error(&format!("output {tensor:?}"), self.start, len, e)
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(dir: &Path, name: &str, len: usize) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, (0..len).map(|i| i as u8).collect::<Vec<_>>()).unwrap();
        p
    }

    #[test]
    fn register_read_write_status_unregister() {
        let dir = tempfile::tempdir().unwrap();
        let p = object(dir.path(), "obj", 100);
        let shm = SharedMemory::with_dir(dir.path());
        shm.register("r", "/obj", 10, 50).unwrap();
        assert_eq!(
            shm.register("r", "/obj", 0, 10),
            Err(ShmError::AlreadyRegistered("r".into()))
        );
        let r = |offset, byte_size| ShmRef {
            region: "r".into(),
            offset,
            byte_size,
        };
        // The region starts at byte 10 of the object.
        assert_eq!(&shm.input("x", &r(2, 3)).unwrap()[..], &[12, 13, 14]);
        let e = shm.input("x", &r(48, 3)).unwrap_err();
        assert_eq!(e.class(), ShmErrorClass::InvalidArgument);
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert!(shm.input("x", &r(u64::MAX, 2)).is_err());

        let out = shm.output("y", &r(40, 4)).unwrap();
        out.write("y", &[9, 9]).unwrap();
        assert!(out.write("y", &[1; 5]).is_err());
        assert_eq!(&std::fs::read(&p).unwrap()[50..53], &[9, 9, 52]);

        assert_eq!(shm.status(None).unwrap().len(), 1);
        assert_eq!(
            shm.status(Some("nope")).unwrap_err().class(),
            ShmErrorClass::NotFound
        );
        // A view taken before unregistering still reads the mapping.
        let held = shm.input("x", &r(0, 4)).unwrap();
        shm.unregister(Some("r"));
        shm.unregister(Some("r"));
        assert_eq!(&held[..], &[10, 11, 12, 13]);
        assert_eq!(
            shm.input("x", &r(0, 1)).unwrap_err(),
            ShmError::UnknownRegion("r".into())
        );
    }

    #[test]
    fn a_shrunk_object_is_an_error_for_the_request_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = object(dir.path(), "obj", 100);
        let shm = SharedMemory::with_dir(dir.path());
        shm.register("r", "/obj", 20, 80).unwrap();
        let r = |offset, byte_size| ShmRef {
            region: "r".into(),
            offset,
            byte_size,
        };
        let out = shm.output("y", &r(60, 8)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(50)
            .unwrap();
        // Bytes 20..50 of the object are still there, 75..80 are not.
        assert_eq!(&shm.input("x", &r(0, 4)).unwrap()[..], &[20, 21, 22, 23]);
        let e = shm.input("x", &r(25, 10)).unwrap_err();
        assert_eq!(e.class(), ShmErrorClass::InvalidArgument);
        assert!(
            e.to_string().contains("shrank") && e.to_string().contains("50 bytes"),
            "{e}"
        );
        let e = out.write("y", &[1; 8]).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 50, "not grown back");
        // Unlinked: the open descriptor still reads what was there.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(&shm.input("x", &r(1, 2)).unwrap()[..], &[21, 22]);
    }

    #[test]
    fn bad_registrations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        object(dir.path(), "obj", 64);
        let shm = SharedMemory::with_dir(dir.path());
        let class = |r: Result<(), ShmError>| r.unwrap_err().class();
        assert_eq!(
            class(shm.register("a", "/missing", 0, 8)),
            ShmErrorClass::NotFound
        );
        assert_eq!(
            class(shm.register("a", "/obj", 60, 8)),
            ShmErrorClass::InvalidArgument
        );
        assert_eq!(
            class(shm.register("a", "/obj", 0, 0)),
            ShmErrorClass::InvalidArgument
        );
        assert_eq!(
            class(shm.register("a", "/obj", u64::MAX, 2)),
            ShmErrorClass::InvalidArgument
        );
        for key in ["", "/", "/../etc/passwd", "a/b", ".."] {
            assert_eq!(
                class(shm.register("a", key, 0, 8)),
                ShmErrorClass::InvalidArgument,
                "{key:?}"
            );
        }
        assert!(shm.status(None).unwrap().is_empty());
        // Unaligned offsets are fine.
        shm.register("a", "obj", 13, 8).unwrap();
    }

    #[test]
    fn registrations_are_bounded_in_number_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        object(dir.path(), "obj", 64);
        let shm = SharedMemory::with_dir(dir.path()).with_limits(2, 100);
        shm.register("a", "obj", 0, 60).unwrap();
        let e = shm.register("b", "obj", 0, 41).unwrap_err();
        assert!(
            matches!(e, ShmError::Limit(_)) && e.to_string().contains("--shm-max-bytes"),
            "{e}"
        );
        shm.register("b", "obj", 0, 40).unwrap();
        let e = shm.register("c", "obj", 0, 1).unwrap_err();
        assert!(e.to_string().contains("--shm-max-regions"), "{e}");
        assert_eq!(e.class(), ShmErrorClass::InvalidArgument);
        shm.unregister(Some("a"));
        shm.register("c", "obj", 0, 1).unwrap();
    }
}
