//! Shared-memory registration and use as a client could drive it: regions
//! registered with any name, key, offset and size; inputs read and outputs
//! written through them; their objects shrunk, grown, unlinked and
//! recreated underneath. Checked against a model of what each call must
//! do: every success and refusal is the expected one, reads return the
//! object's bytes, nothing outside the scratch directory is opened, the
//! limits hold, and a shrunk object is an error, never a SIGBUS.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use shoal::shm::{SharedMemory, ShmRef};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

const OBJECTS: [&str; 3] = ["a", "b", "c"];
const MAX_REGIONS: usize = 4;
const MAX_BYTES: u64 = 1024;

#[derive(Arbitrary, Debug, Clone)]
enum Name {
    Small(u8),
    Any(String),
}

impl Name {
    fn get(&self) -> String {
        match self {
            Name::Small(n) => format!("r{}", n % 4),
            Name::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Key {
    Object { index: u8, slash: bool },
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Register {
        name: Name,
        key: Key,
        offset: u64,
        size: u64,
    },
    Unregister(Option<Name>),
    Read {
        name: Name,
        offset: u64,
        size: u16,
    },
    Write {
        name: Name,
        offset: u64,
        size: u16,
        data: Vec<u8>,
    },
    Resize {
        object: u8,
        len: u16,
    },
    Remove {
        object: u8,
    },
    Status(Option<Name>),
}

/// The model: objects are inodes (a region keeps its inode after an
/// unlink), names point at inodes, regions at windows of inodes.
#[derive(Default)]
struct Model {
    inodes: Vec<Vec<u8>>,
    names: [Option<usize>; 3],
    regions: BTreeMap<String, (usize, u64, u64)>,
}

/// `key` as `SharedMemory` must resolve it: one leading slash dropped,
/// then a plain file name. `None`: the key must be refused.
fn object_of(key: &str) -> Option<&str> {
    let name = key.strip_prefix('/').unwrap_or(key);
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.contains(['/', '\0'])
        && name != "."
        && name != "..";
    plain.then_some(name)
}

fn dirs() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let base = shoal_fuzz::scratch_dir("shm");
        let dir = base.join("objects");
        std::fs::create_dir_all(&dir).expect("objects dir");
        // A file beside the directory: a key that escaped it would reach
        // this, and the check after each case would see it touched.
        std::fs::write(base.join("secret"), b"secret").expect("secret");
        (base, dir)
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let (base, dir) = dirs();
    let mut m = Model::default();
    for (i, name) in OBJECTS.iter().enumerate() {
        let bytes: Vec<u8> = (0..64u32 * (i as u32 + 1))
            .map(|b| b as u8 ^ i as u8)
            .collect();
        std::fs::write(dir.join(name), &bytes).expect("object");
        m.names[i] = Some(m.inodes.len());
        m.inodes.push(bytes);
    }
    let shm = SharedMemory::with_dir(dir).with_limits(MAX_REGIONS, MAX_BYTES);
    for op in ops.into_iter().take(64) {
        match op {
            Op::Register {
                name,
                key,
                offset,
                size,
            } => {
                let name = name.get();
                let key = match key {
                    Key::Object { index, slash } => {
                        let o = OBJECTS[index as usize % 3];
                        if slash {
                            format!("/{o}")
                        } else {
                            o.to_string()
                        }
                    }
                    Key::Any(s) => s,
                };
                let inode = object_of(&key)
                    .and_then(|o| OBJECTS.iter().position(|x| *x == o))
                    .and_then(|i| m.names[i]);
                let total: u64 = m.regions.values().map(|r| r.2).sum();
                let expect = !name.is_empty()
                    && !m.regions.contains_key(&name)
                    && size > 0
                    && m.regions.len() < MAX_REGIONS
                    && total.saturating_add(size) <= MAX_BYTES
                    && inode.is_some_and(|n| {
                        offset
                            .checked_add(size)
                            .is_some_and(|end| end <= m.inodes[n].len() as u64)
                    });
                let got = shm.register(&name, &key, offset, size);
                assert_eq!(
                    got.is_ok(),
                    expect,
                    "register {name:?} {key:?} {offset} {size}: {got:?}"
                );
                if let (true, Some(n)) = (expect, inode) {
                    m.regions.insert(name, (n, offset, size));
                }
            }
            Op::Unregister(name) => {
                let name = name.map(|n| n.get());
                shm.unregister(name.as_deref());
                match name {
                    Some(n) => {
                        m.regions.remove(&n);
                    }
                    None => m.regions.clear(),
                }
            }
            Op::Read { name, offset, size } => {
                let r = ShmRef {
                    region: name.get(),
                    offset,
                    byte_size: size as u64,
                };
                let want = m.regions.get(&r.region).and_then(|&(n, start, len)| {
                    let end = offset.checked_add(size as u64).filter(|e| *e <= len)?;
                    let (at, to) = (start + offset, start + end);
                    let bytes = &m.inodes[n];
                    if size == 0 {
                        return Some(Vec::new());
                    }
                    (to <= bytes.len() as u64).then(|| bytes[at as usize..to as usize].to_vec())
                });
                match (shm.input("t", &r), want) {
                    (Ok(got), Some(want)) => assert_eq!(&got[..], &want[..], "read {r:?}"),
                    (Err(_), None) => {}
                    (got, want) => panic!("read {r:?}: got {got:?}, the model says {want:?}"),
                }
            }
            Op::Write {
                name,
                offset,
                size,
                data,
            } => {
                let r = ShmRef {
                    region: name.get(),
                    offset,
                    byte_size: size as u64,
                };
                let window = m.regions.get(&r.region).and_then(|&(n, start, len)| {
                    offset.checked_add(size as u64).filter(|e| *e <= len)?;
                    Some((n, start + offset))
                });
                let target = shm.output("t", &r);
                assert_eq!(target.is_ok(), window.is_some(), "output {r:?}");
                let (Ok(target), Some((n, at))) = (target, window) else {
                    continue;
                };
                let fits = data.len() as u64 <= size as u64
                    && at + data.len() as u64 <= m.inodes[n].len() as u64;
                let got = target.write("t", &data);
                assert_eq!(
                    got.is_ok(),
                    fits,
                    "write {} bytes to {r:?}: {got:?}",
                    data.len()
                );
                if fits {
                    m.inodes[n][at as usize..at as usize + data.len()].copy_from_slice(&data);
                }
            }
            Op::Resize { object, len } => {
                let i = object as usize % 3;
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(OBJECTS[i]))
                    .expect("open object");
                file.set_len(len as u64).expect("set_len");
                let n = *m.names[i].get_or_insert_with(|| {
                    m.inodes.push(Vec::new());
                    m.inodes.len() - 1
                });
                m.inodes[n].resize(len as usize, 0);
            }
            Op::Remove { object } => {
                let i = object as usize % 3;
                if m.names[i].take().is_some() {
                    std::fs::remove_file(dir.join(OBJECTS[i])).expect("unlink");
                }
            }
            Op::Status(name) => {
                let name = name.map(|n| n.get());
                let got = shm.status(name.as_deref());
                match &name {
                    Some(n) => assert_eq!(got.is_ok(), m.regions.contains_key(n)),
                    None => assert_eq!(got.map(|v| v.len()).ok(), Some(m.regions.len())),
                }
            }
        }
        let regions = shm.status(None).expect("status");
        assert!(regions.len() <= MAX_REGIONS);
        assert!(regions.iter().map(|r| r.byte_size).sum::<u64>() <= MAX_BYTES);
    }
    assert_eq!(
        std::fs::read(base.join("secret")).ok().as_deref(),
        Some(&b"secret"[..])
    );
    let stray: Vec<_> = std::fs::read_dir(dir)
        .expect("objects dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| !OBJECTS.iter().any(|o| *o == n.as_os_str()))
        .collect();
    assert!(
        stray.is_empty(),
        "files created in the objects dir: {stray:?}"
    );
});
