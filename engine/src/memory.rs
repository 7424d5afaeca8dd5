//! Guest memory: named blocks of page-aligned memory that pagewire reads (sender) or writes
//! (receiver) in place.
//!
//! A block is backed by a memmap2 mapping (anonymous, or a file mapped shared, read-only or
//! copy-on-write) or by memory an embedding VMM owns ([`Block::from_raw`]). pagewire never
//! copies a raw page in user space: iovecs point straight into these blocks.
//!
//! Concurrency model: guest memory is shared with a running guest (sender) or written by
//! several channel threads at once (receiver, each page by exactly one packet at a time, see
//! the round barrier in the session). Blocks therefore hand out raw pointers, not Rust
//! references; the only place a page is viewed as a slice is a short, documented window in
//! the channel code. A page the guest changes while it is being read may be sent torn; the
//! change dirtied it and the next round resends it (DESIGN.md §2).

use std::fs::File;
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions, MmapRaw};
use thiserror::Error;

use crate::datamap::Contents;

/// Errors of the guest-memory layer.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("block '{name}': size {size} is not a non-zero multiple of the page size {page_size}")]
    BadSize {
        name: String,
        size: u64,
        page_size: u32,
    },
    #[error("block '{name}': name must be 1..=255 bytes of UTF-8 without NUL")]
    BadName { name: String },
    #[error("block '{name}' appears twice")]
    Duplicate { name: String },
    #[error("block '{name}': cannot map {size} bytes: {source}")]
    Map {
        name: String,
        size: u64,
        source: std::io::Error,
    },
    #[error("block '{name}' is read-only; a receiver needs writable memory")]
    ReadOnly { name: String },
    #[error("no block named '{0}'")]
    NoBlock(String),
    #[error("memory of {requested} bytes exceeds the limit of {limit} bytes")]
    TooLarge { requested: u64, limit: u64 },
    /// A file that cannot be guest memory: a directory, a character device, a pipe...
    #[error(
        "block '{name}': the file is {what}; guest memory must be a regular file or a block device"
    )]
    NotMappable { name: String, what: &'static str },
    #[error("block '{name}': the file is empty")]
    EmptyFile { name: String },
    #[error("block '{name}': reading the file's size: {source}")]
    FileSize {
        name: String,
        source: std::io::Error,
    },
    /// The file behind a block became shorter than the block while it was being sent: the
    /// pages past its new end were not sent (they would have read as zeros, or faulted).
    #[error(
        "block '{name}': its file shrank from {was} to {now} bytes while being sent (truncated by another process?); the pages past byte {now} were not sent"
    )]
    FileShrank { name: String, was: u64, now: u64 },
}

/// What kind of file `ft` is, in words.
fn file_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a pipe (FIFO)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

enum Backing {
    /// Anonymous memory or a private copy-on-write file mapping.
    Owned(#[allow(dead_code)] MmapMut),
    /// A shared or read-only file mapping.
    File(#[allow(dead_code)] MmapRaw),
    /// Memory owned by the embedding VMM.
    External,
    /// Memory owned by an object the block keeps alive (e.g. a vm-memory `MmapRegion`).
    Kept(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>),
}

/// One named, contiguous block of guest memory.
pub struct Block {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// What the memory is made of: lets the sender find never-written pages (`datamap`).
    contents: Contents,
    /// Sender: drop this mapping's copy of a page once its packet is sent (file mappings).
    release_sent: bool,
    _backing: Backing,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

// SAFETY: a Block is a pointer to memory that stays mapped for the Block's life; pagewire
// accesses it only through raw pointers whose concurrent use is governed by the engine's
// protocol (one writer per page at a time on the receiver; reads of possibly-changing guest
// pages on the sender are tolerated by design, see the module docs).
unsafe impl Send for Block {}
// SAFETY: as for Send: no &-method hands out a reference that could alias a write.
unsafe impl Sync for Block {}

fn check_name(name: &str) -> Result<(), MemoryError> {
    if name.is_empty() || name.len() > 255 || name.as_bytes().contains(&0) {
        return Err(MemoryError::BadName {
            name: name.to_string(),
        });
    }
    Ok(())
}

impl Block {
    /// Anonymous, zero-filled, writable memory (MAP_NORESERVE: pages cost nothing until
    /// touched).
    pub fn anonymous(name: &str, size: usize) -> Result<Block, MemoryError> {
        check_name(name)?;
        let mut map = MmapOptions::new()
            .len(size)
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| MemoryError::Map {
                name: name.to_string(),
                size: size as u64,
                source,
            })?;
        let ptr = NonNull::new(map.as_mut_ptr()).ok_or_else(|| MemoryError::Map {
            name: name.to_string(),
            size: size as u64,
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(Block {
            name: name.into(),
            ptr,
            len: size,
            writable: true,
            contents: Contents::Anonymous,
            release_sent: false,
            _backing: Backing::Owned(map),
        })
    }

    /// Populate the block: fault every page in, writable, now (MADV_POPULATE_WRITE, Linux
    /// 5.14+), so that receiving into it later takes no page faults (a receiver's `prealloc`,
    /// like QEMU's destination prealloc). Contents are unchanged. Fails on older kernels
    /// and on read-only blocks.
    pub fn populate(&self) -> std::io::Result<()> {
        self.populate_range(0, self.len)
    }

    /// Populate `len` bytes at `offset` (page-aligned, inside the block): as
    /// [`Block::populate`], for one range. A receiver calls it for a packet's pages that are
    /// still fresh just before receiving them: one call faults a run of pages in, where the
    /// kernel's copy into them would take one page fault per page.
    pub fn populate_range(&self, offset: u64, len: usize) -> std::io::Result<()> {
        if !self.writable {
            return Err(std::io::Error::other("read-only block"));
        }
        let Some(ptr) = self.range_ptr(offset, len) else {
            return Err(std::io::Error::other("range outside the block"));
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: ptr..ptr+len is inside this block's mapping (checked by `range_ptr`), alive
        // for `self`'s lifetime; MADV_POPULATE_WRITE only faults pages in and leaves their
        // contents as they are (a misaligned range is refused with EINVAL, nothing else).
        let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// A file mapped into memory. `writable`: shared writable mapping (writes go to the
    /// file); otherwise read-only. `copy_on_write`: private writable mapping (writes stay in
    /// this process; used to simulate a live guest over an image file).
    pub fn from_file(
        name: &str,
        file: &File,
        writable: bool,
        copy_on_write: bool,
    ) -> Result<Block, MemoryError> {
        check_name(name)?;
        let size_err = |source| MemoryError::FileSize {
            name: name.to_string(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let ft = meta.file_type();
        let len = if ft.is_file() {
            meta.len()
        } else if std::os::unix::fs::FileTypeExt::is_block_device(&ft) {
            // A block device's metadata says 0: its size is where its end is.
            std::io::Seek::seek(&mut &*file, std::io::SeekFrom::End(0)).map_err(size_err)?
        } else {
            return Err(MemoryError::NotMappable {
                name: name.to_string(),
                what: file_kind(&ft),
            });
        };
        if len == 0 {
            return Err(MemoryError::EmptyFile {
                name: name.to_string(),
            });
        }
        let map_err = |source| MemoryError::Map {
            name: name.to_string(),
            size: len,
            source,
        };
        let opts = MmapOptions::new();
        let (ptr, backing) = if copy_on_write {
            // SAFETY: a private mapping: later changes of the file by others may or may not
            // show through, which at worst sends stale bytes (the image is ours to send);
            // Rust references are never formed over it except under as_slice's contract.
            let mut map = unsafe { opts.map_copy(file) }.map_err(map_err)?;
            (map.as_mut_ptr(), Backing::Owned(map))
        } else {
            let raw = if writable {
                opts.map_raw(file)
            } else {
                opts.map_raw_read_only(file)
            }
            .map_err(map_err)?;
            (raw.as_mut_ptr(), Backing::File(raw))
        };
        let ptr =
            NonNull::new(ptr).ok_or_else(|| map_err(std::io::Error::other("null mapping")))?;
        let len = usize::try_from(len).map_err(|_| map_err(std::io::Error::other("too large")))?;
        let contents = match file.try_clone() {
            Ok(f) => Contents::File {
                file: std::sync::Arc::new(f),
                offset: 0,
                shared: !copy_on_write,
            },
            Err(_) => Contents::Unknown,
        };
        Ok(Block {
            name: name.into(),
            ptr,
            len,
            writable: writable || copy_on_write,
            contents,
            release_sent: false,
            _backing: backing,
        })
    }

    /// A file-backed block whose regular file is now shorter than the block.
    fn check_file(&self) -> Result<(), MemoryError> {
        let Contents::File { file, offset, .. } = &self.contents else {
            return Ok(());
        };
        let Ok(meta) = file.metadata() else {
            return Ok(());
        };
        // Block devices report 0 and cannot shrink under a mapping the way files do.
        if !meta.is_file() {
            return Ok(());
        }
        let was = offset.saturating_add(self.len as u64);
        if meta.len() < was {
            return Err(MemoryError::FileShrank {
                name: self.name.clone(),
                was,
                now: meta.len(),
            });
        }
        Ok(())
    }

    /// Memory the embedding VMM owns (its guest RAM mapping).
    ///
    /// # Safety
    /// - `ptr..ptr + len` must be one mapping that stays valid (mapped, not unmapped or
    ///   remapped) for as long as this Block or any sender/receiver using it exists;
    /// - if `writable`, the receiver writes pages there from its channel threads: nothing else
    ///   may access that memory through Rust references while a receiver runs (the guest
    ///   must be stopped on the destination);
    /// - on the sender, the guest may keep writing (pages may be read torn and are resent by
    ///   the next round), but the memory must be readable for the whole time.
    pub unsafe fn from_raw(
        name: &str,
        ptr: NonNull<u8>,
        len: usize,
        writable: bool,
    ) -> Result<Block, MemoryError> {
        check_name(name)?;
        Ok(Block {
            name: name.into(),
            ptr,
            len,
            writable,
            contents: Contents::Unknown,
            release_sent: false,
            _backing: Backing::External,
        })
    }

    /// Memory owned by `owner`, which the block keeps alive (and drops with the last user of
    /// the block): the way to hand pagewire a mapping an `Arc` owns, such as vm-memory's
    /// `MmapRegion` (see `rust_vmm::guest_ram`).
    ///
    /// # Safety
    /// - `ptr..ptr + len` must be one mapping that stays valid for as long as `owner` lives
    ///   (owner's drop may unmap it; nothing else may);
    /// - the access rules of [`Block::from_raw`] apply: the destination's guest does not run
    ///   while a receiver writes; on the source the guest may run (torn pages are resent).
    pub unsafe fn from_raw_owned(
        name: &str,
        ptr: NonNull<u8>,
        len: usize,
        writable: bool,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Block, MemoryError> {
        check_name(name)?;
        Ok(Block {
            name: name.into(),
            ptr,
            len,
            writable,
            contents: Contents::Unknown,
            release_sent: false,
            _backing: Backing::Kept(owner),
        })
    }

    /// The block's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty block (never valid in a session).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// What the memory is made of, for finding never-written pages without reading them.
    pub fn contents(&self) -> &Contents {
        &self.contents
    }

    /// Declare what the memory is made of (a VMM's own memory, [`Block::from_raw`], is
    /// [`Contents::Unknown`] until it says so): `Anonymous` for private anonymous memory,
    /// `File` for a mapping of a memfd, shmem or image file. The sender then sends pages the
    /// kernel reports as never written as zero pages without reading them. A wrong declaration
    /// sends zeros for data: declare only what is true of the whole block.
    pub fn with_contents(mut self, contents: Contents) -> Block {
        self.contents = contents;
        self
    }

    /// Sender: once a packet's pages have been sent, drop them from this mapping
    /// (`MADV_DONTNEED`), so sending a large image does not grow the process's resident memory
    /// by the image's size. Only for a shared or read-only file mapping
    /// ([`Block::from_file`] without copy-on-write), where that loses nothing: a dropped page
    /// is read back from the file if it is needed again. Other blocks are left as they are.
    pub fn release_after_send(mut self) -> Block {
        if matches!(self._backing, Backing::File(_)) {
            self.release_sent = true;
        } else {
            tracing::warn!(block = %self.name, "release after send applies to shared or read-only file mappings only; ignored");
        }
        self
    }

    /// Whether sent pages are dropped from this mapping ([`Block::release_after_send`]).
    pub fn releases_after_send(&self) -> bool {
        self.release_sent
    }

    /// Drop `len` bytes at `offset` from this mapping if the block releases sent pages; the
    /// range is shrunk to whole host pages. The memory stays mapped: a later access reads the
    /// file again.
    pub(crate) fn release(&self, offset: u64, len: usize) {
        if !self.release_sent {
            return;
        }
        let hp = crate::datamap::host_page_size() as usize;
        let (Ok(off), true) = (usize::try_from(offset), hp.is_power_of_two()) else {
            return;
        };
        let start = off.next_multiple_of(hp);
        let end = off.saturating_add(len).min(self.len) & !(hp - 1);
        if start >= end {
            return;
        }
        // SAFETY: start..end lies inside this block's mapping, which is a shared or read-only
        // file mapping (release_sent is only set for those): MADV_DONTNEED there only unmaps
        // page-cache pages from this process, the file keeps the data and the next access
        // faults it back in. No Rust reference to the range is held across this call (guest
        // memory is only accessed through raw pointers, see the module docs).
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            tracing::debug!(block = %self.name, error = %std::io::Error::last_os_error(), "madvise(DONTNEED) failed");
        }
    }

    /// Whether a receiver may write it.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Base pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Pointer to `len` bytes at `offset`, or `None` when they are not inside the block.
    pub fn range_ptr(&self, offset: u64, len: usize) -> Option<*mut u8> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(self.ptr.as_ptr().wrapping_add(off))
    }

    /// Copy the whole block into a byte vector (tests and tools; guest must be stopped).
    pub fn to_vec(&self) -> Vec<u8> {
        // SAFETY: ptr..ptr+len is mapped for our lifetime (constructor contracts); callers use
        // this only while no channel writes (documented).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }.to_vec()
    }

    /// View the block as bytes.
    ///
    /// # Safety
    /// No thread may write the block while the returned slice lives (no receiver running on
    /// it, guest stopped).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: mapped for our lifetime; the caller excludes concurrent writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// View the block as mutable bytes (to fill it before a session).
    ///
    /// # Safety
    /// The block must be writable, and nothing else may access it while the slice lives.
    #[allow(clippy::mut_from_ref)] // guest memory is shared raw memory; exclusivity is the caller's contract
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: mapped writable for our lifetime; the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A set of named blocks: a guest's memory layout.
#[derive(Debug, Default)]
pub struct GuestRam {
    blocks: Vec<Block>,
}

impl GuestRam {
    /// Check that no block's file has become shorter than the block since it was mapped
    /// ([`MemoryError::FileShrank`]). The sender runs it after every round: a truncated
    /// image's missing pages would otherwise be sent as zeros without a word.
    pub fn check_files(&self) -> Result<(), MemoryError> {
        self.blocks.iter().try_for_each(Block::check_file)
    }

    /// A layout from blocks; names must be unique.
    pub fn new(blocks: Vec<Block>) -> Result<GuestRam, MemoryError> {
        for (i, b) in blocks.iter().enumerate() {
            if blocks[..i].iter().any(|o| o.name == b.name) {
                return Err(MemoryError::Duplicate {
                    name: b.name.clone(),
                });
            }
        }
        Ok(GuestRam { blocks })
    }

    /// Anonymous zeroed memory for a layout (the receiver's memory when it has none of its
    /// own). `limit` bounds the total so a peer cannot make us map arbitrary amounts.
    pub fn anonymous(layout: &[(String, u64)], limit: u64) -> Result<GuestRam, MemoryError> {
        let total = layout
            .iter()
            .try_fold(0u64, |a, (_, s)| a.checked_add(*s))
            .unwrap_or(u64::MAX);
        if total > limit {
            return Err(MemoryError::TooLarge {
                requested: total,
                limit,
            });
        }
        let blocks = layout
            .iter()
            .map(|(name, size)| {
                let size = usize::try_from(*size).map_err(|_| MemoryError::TooLarge {
                    requested: *size,
                    limit,
                })?;
                Block::anonymous(name, size)
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestRam::new(blocks)
    }

    /// The blocks in layout order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    /// Block by index.
    pub fn block(&self, i: usize) -> Option<&Block> {
        self.blocks.get(i)
    }
    /// Index of the block named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }
    /// Total bytes.
    pub fn total_len(&self) -> u64 {
        self.blocks.iter().map(|b| b.len as u64).sum()
    }
    /// The layout as (name, size) pairs.
    pub fn layout(&self) -> Vec<(String, u64)> {
        self.blocks
            .iter()
            .map(|b| (b.name.clone(), b.len as u64))
            .collect()
    }
    /// Check every block is a non-zero multiple of `page_size`.
    pub fn check_page_size(&self, page_size: u32) -> Result<(), MemoryError> {
        for b in &self.blocks {
            if b.len == 0 || b.len % page_size as usize != 0 {
                return Err(MemoryError::BadSize {
                    name: b.name.clone(),
                    size: b.len as u64,
                    page_size,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Populating faults every page in (the mapping's resident size grows to the block) and
    /// changes no byte.
    #[test]
    fn populate_faults_pages_in_and_keeps_contents() {
        let b = Block::anonymous("ram", 4 << 20).expect("map");
        // SAFETY: fresh block, only this test uses it.
        unsafe { b.as_mut_slice()[5000] = 7 };
        match b.populate() {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("SKIP populate: kernel lacks MADV_POPULATE_WRITE (5.14+)");
                return;
            }
            r => r.expect("populate"),
        }
        let mut vec = vec![0u8; (4 << 20) / 4096];
        // SAFETY: the range is the block's mapping; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(b.as_ptr().cast(), b.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(vec.iter().all(|v| v & 1 == 1), "every page resident");
        // SAFETY: as above.
        let s = unsafe { b.as_slice() };
        assert_eq!(s[5000], 7);
        assert_eq!(s.iter().map(|&x| x as u64).sum::<u64>(), 7);
    }

    /// Populating a range faults exactly those pages in, keeps their contents, and refuses a
    /// range outside the block.
    #[test]
    fn populate_range_faults_only_that_range() {
        let b = Block::anonymous("ram", 64 * 4096).expect("map");
        // SAFETY: fresh block, only this test uses it.
        unsafe { b.as_mut_slice()[8 * 4096 + 3] = 9 };
        match b.populate_range(8 * 4096, 16 * 4096) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("SKIP populate_range: kernel lacks MADV_POPULATE_WRITE (5.14+)");
                return;
            }
            r => r.expect("populate_range"),
        }
        let mut vec = vec![0u8; 64];
        // SAFETY: the range is the block's mapping; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(b.as_ptr().cast(), b.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let resident: Vec<usize> = (0..64).filter(|&i| vec[i] & 1 == 1).collect();
        assert_eq!(resident, (8..24).collect::<Vec<_>>());
        // SAFETY: as above.
        assert_eq!(unsafe { b.as_slice() }[8 * 4096 + 3], 9);
        assert!(
            b.populate_range(60 * 4096, 8 * 4096).is_err(),
            "past the end"
        );
    }

    #[test]
    fn range_ptr_bounds() {
        let b = Block::anonymous("ram", 8192).expect("map");
        assert!(b.range_ptr(0, 4096).is_some());
        assert!(b.range_ptr(4096, 4096).is_some());
        assert!(b.range_ptr(4097, 4096).is_none());
        assert!(b.range_ptr(u64::MAX, 4096).is_none());
        assert!(b.range_ptr(8192, 0).is_some());
    }

    #[test]
    fn names_checked_and_unique() {
        assert!(matches!(
            Block::anonymous("", 4096),
            Err(MemoryError::BadName { .. })
        ));
        assert!(matches!(
            Block::anonymous("a\0b", 4096),
            Err(MemoryError::BadName { .. })
        ));
        let a = Block::anonymous("x", 4096).expect("map");
        let b = Block::anonymous("x", 4096).expect("map");
        assert!(matches!(
            GuestRam::new(vec![a, b]),
            Err(MemoryError::Duplicate { .. })
        ));
    }

    #[test]
    fn anonymous_layout_respects_limit() {
        let layout = vec![("a".to_string(), 1u64 << 20), ("b".to_string(), 1u64 << 20)];
        assert!(matches!(
            GuestRam::anonymous(&layout, 1 << 20),
            Err(MemoryError::TooLarge { .. })
        ));
        let m = GuestRam::anonymous(&layout, 4 << 20).expect("map");
        assert_eq!(m.total_len(), 2 << 20);
        assert_eq!(m.find("b"), Some(1));
        m.check_page_size(4096).expect("aligned");
        assert!(m.check_page_size(3 << 20).is_err());
    }
}
