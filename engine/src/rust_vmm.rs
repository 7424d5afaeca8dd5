//! rust-vmm integration (cargo feature `vm-memory`, on by default): guest memory from a
//! [`vm_memory::GuestMemoryMmap`] and dirty pages from vm-memory's bitmaps.
//!
//! - [`guest_ram`] turns every region of a `GuestMemoryMmap` into a [`Block`] that points
//!   at the region's own host mapping (no copy) and keeps that mapping alive; block `i` is the
//!   `i`-th region in guest-address order, named after its guest address (`ram@0x100000000`)
//!   or by the caller ([`guest_ram_named`]). The same layout gives the same names on both
//!   hosts, so the destination VMM builds its receiving memory the same way.
//! - [`collect_dirty`] drains (reads and clears) each region's vm-memory bitmap into a
//!   [`DirtyLog`]: the pages the VMM itself wrote through vm-memory (device emulation,
//!   virtio queues). The vCPUs' writes are not in it; they come from KVM's dirty log, one
//!   bitmap per memory slot, which [`DirtyLog::add_bitmap`] takes as it is
//!   (`VmFd::get_dirty_log(slot, size)` in kvm-ioctls).
//!
//! # Sharing memory with a running guest (the safety contract)
//!
//! pagewire accesses the regions through raw pointers, as the guest and KVM do, never through
//! vm-memory's accessors:
//!
//! - **Source (sender).** The guest keeps running during the live rounds and may write any
//!   page while pagewire reads it. A page read mid-write is sent torn; the write dirtied it,
//!   so the next round sends it again, and the last round runs with the vCPUs paused and the
//!   device models quiesced, so what arrives last is consistent. The engine copies a page
//!   before compressing it, so a torn read never breaks the stream itself. Hence the order:
//!   collect the dirty log (KVM's and [`collect_dirty`]) *after* a round has been sent and
//!   *before* the next one, and once more after pausing the vCPUs for the final round.
//! - **Destination (receiver).** Channel threads write pages into the regions while the
//!   session runs: the destination's vCPUs must not run, and the VMM must not read or write
//!   guest memory, until [`crate::Receiver::serve`] has returned. pagewire's writes bypass
//!   vm-memory, so they do not mark the destination's vm-memory bitmaps dirty.
//! - **Lifetime.** Each block holds an `Arc` of its region's `MmapRegion`, so the mapping
//!   outlives every session using it even if the VMM drops or replaces its `GuestMemoryMmap`
//!   (memory hot-unplug during a migration must instead cancel it: the new layout is not the
//!   one the hello announced).

use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::datamap::Contents;
use crate::dirty::{DirtyError, DirtyLog};
use crate::memory::{Block, GuestRam, MemoryError};

/// The default block name of a region: its guest physical address, `ram@0x...`.
pub fn block_name(addr: GuestAddress) -> String {
    format!("ram@{:#x}", addr.0)
}

/// A [`GuestRam`] over every region of `mem`, named by [`block_name`]. No memory is
/// copied; see the module docs for the contract while a guest runs.
pub fn guest_ram<B>(mem: &GuestMemoryMmap<B>) -> Result<GuestRam, MemoryError>
where
    B: Bitmap + Send + Sync + 'static,
{
    guest_ram_named(mem, |_, addr| block_name(addr))
}

/// Like [`guest_ram`], with `name(index, guest_address)` naming each region's block
/// (e.g. QEMU's `pc.ram` for a destination that is a QEMU-compatible decoder).
pub fn guest_ram_named<B, F>(mem: &GuestMemoryMmap<B>, mut name: F) -> Result<GuestRam, MemoryError>
where
    B: Bitmap + Send + Sync + 'static,
    F: FnMut(usize, GuestAddress) -> String,
{
    let mut blocks = Vec::with_capacity(mem.num_regions());
    for (i, region) in mem.iter().enumerate() {
        let block_name = name(i, region.start_addr());
        let mapping: Arc<MmapRegion<B>> = region.get_mmap();
        let len = mapping.size();
        let ptr = NonNull::new(mapping.as_ptr()).ok_or_else(|| MemoryError::Map {
            name: block_name.clone(),
            size: len as u64,
            source: std::io::Error::other("vm-memory region with a null mapping"),
        })?;
        let writable = mapping.prot() & libc::PROT_WRITE != 0;
        let contents = contents_of(&mapping);
        // SAFETY: `ptr..ptr+len` is the region's whole mapping (MmapRegion::as_ptr/size),
        // which stays mapped while its MmapRegion lives; the block owns an Arc of that
        // MmapRegion, so the mapping outlives the block. The access rules (guest stopped on
        // the destination, torn reads tolerated on the source) are this module's contract.
        let block =
            unsafe { Block::from_raw_owned(&block_name, ptr, len, writable, Box::new(mapping)) }?;
        blocks.push(block.with_contents(contents));
    }
    GuestRam::new(blocks)
}

/// What a region's mapping is made of, from how vm-memory mapped it: a file (memfd, shmem,
/// hugetlbfs, image) at its offset, shared or private; private anonymous memory; else unknown.
/// The sender then finds never-written pages without reading them (`datamap`).
fn contents_of<B: Bitmap>(m: &MmapRegion<B>) -> Contents {
    let flags = m.flags();
    let shared = flags & libc::MAP_SHARED != 0;
    match m.file_offset() {
        Some(fo) => match fo.file().try_clone() {
            Ok(file) => Contents::File {
                file: Arc::new(file),
                offset: fo.start(),
                shared,
            },
            Err(_) => Contents::Unknown,
        },
        None if flags & libc::MAP_ANONYMOUS != 0 && !shared => Contents::Anonymous,
        None => Contents::Unknown,
    }
}

/// vm-memory bitmap types whose dirty bits [`collect_dirty`] can drain.
pub trait DrainBitmap {
    /// Pages the bitmap tracks, or `None` when it tracks nothing.
    fn tracked_pages(&self) -> Option<usize>;
    /// Read and clear the bitmap's words (each word atomically: a bit set meanwhile is either
    /// returned now or stays for the next call, never lost).
    fn drain_words(&self) -> Vec<u64>;
}

impl DrainBitmap for AtomicBitmap {
    fn tracked_pages(&self) -> Option<usize> {
        Some(self.len())
    }
    fn drain_words(&self) -> Vec<u64> {
        self.get_and_reset()
    }
}

impl DrainBitmap for Option<AtomicBitmap> {
    fn tracked_pages(&self) -> Option<usize> {
        self.as_ref().map(AtomicBitmap::len)
    }
    fn drain_words(&self) -> Vec<u64> {
        self.as_ref()
            .map(AtomicBitmap::get_and_reset)
            .unwrap_or_default()
    }
}

impl DrainBitmap for () {
    fn tracked_pages(&self) -> Option<usize> {
        None
    }
    fn drain_words(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// Drain every region's vm-memory dirty bitmap into `log` (region `i` into block `i`: the log
/// must have been made for [`guest_ram`] of the same `mem`). Returns the pages the bitmaps
/// held. Nothing is drained when a bitmap's pages are not the log's (an error): dirty bits are
/// never lost to a mismatch.
pub fn collect_dirty<B>(mem: &GuestMemoryMmap<B>, log: &mut DirtyLog) -> Result<u64, DirtyError>
where
    B: Bitmap + DrainBitmap,
{
    let ps = u64::from(log.page_size().max(1));
    if mem.num_regions() != log.blocks() {
        return Err(DirtyError::Layout {
            regions: mem.num_regions(),
            blocks: log.blocks(),
        });
    }
    for (i, region) in mem.iter().enumerate() {
        if let Some(pages) = MmapRegion::bitmap(region).tracked_pages() {
            let want = region.len() / ps;
            if pages as u64 != want {
                return Err(DirtyError::PageSize {
                    block: i,
                    got: region.len() / (pages.max(1) as u64),
                    want: ps,
                });
            }
        }
    }
    let mut n = 0;
    for (i, region) in mem.iter().enumerate() {
        let words = MmapRegion::bitmap(region).drain_words();
        n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        log.add_bitmap(i, &words)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: usize = 1 << 20;

    fn two_regions() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB),
            (GuestAddress(0x1_0000_0000), MIB),
        ])
        .expect("mmap")
    }

    #[test]
    fn regions_become_blocks_over_the_same_host_memory() {
        let vm = two_regions();
        let mem = guest_ram(&vm).expect("blocks");
        assert_eq!(
            mem.layout(),
            vec![
                ("ram@0x0".to_string(), 2 * MIB as u64),
                ("ram@0x100000000".to_string(), MIB as u64)
            ]
        );
        // vm-memory's anonymous regions are declared as such: holes are found, not read.
        assert!(mem
            .blocks()
            .iter()
            .all(|b| matches!(b.contents(), crate::datamap::Contents::Anonymous)));
        // A write through vm-memory is visible through the block: the same memory.
        vm.write_slice(b"hello", GuestAddress(0x1_0000_0000 + 4096))
            .expect("write");
        let b = mem.block(1).expect("block");
        // SAFETY: nothing writes the memory meanwhile.
        assert_eq!(&unsafe { b.as_slice() }[4096..4101], b"hello");
        assert!(b.is_writable());
        // The blocks keep the mappings alive after the VMM drops its GuestMemoryMmap.
        drop(vm);
        // SAFETY: as above.
        assert_eq!(&unsafe { b.as_slice() }[4096..4101], b"hello");
        let named = guest_ram_named(&two_regions(), |i, _| format!("slot{i}")).expect("named");
        assert_eq!(named.find("slot1"), Some(1));
    }

    #[test]
    fn vm_memory_bitmaps_drain_into_the_log() {
        let vm = two_regions();
        let mem = guest_ram(&vm).expect("blocks");
        let mut log = DirtyLog::new(&mem, 4096);
        // GuestMemoryMmap::from_ranges starts with clean bitmaps; VMM writes dirty them.
        vm.write_slice(&[1u8; 10], GuestAddress(4096 * 3 + 4090))
            .expect("write");
        vm.write_slice(&[2u8; 1], GuestAddress(0x1_0000_0000 + 4096 * 255))
            .expect("write");
        assert_eq!(collect_dirty(&vm, &mut log).expect("collect"), 3);
        assert!(log.is_dirty(0, 3) && log.is_dirty(0, 4) && log.is_dirty(1, 255));
        assert_eq!(log.pages(), 3);
        // Drained: a second collection adds nothing.
        assert_eq!(collect_dirty(&vm, &mut log).expect("collect"), 0);
        // A log of another page size is refused and leaves the bitmaps alone.
        vm.write_slice(&[3u8; 1], GuestAddress(0)).expect("write");
        let mut wrong = DirtyLog::new(&mem, 8192);
        assert!(matches!(
            collect_dirty(&vm, &mut wrong),
            Err(DirtyError::PageSize { .. })
        ));
        assert_eq!(collect_dirty(&vm, &mut log).expect("collect"), 1);
        // A log of another layout (one block) is refused.
        let one = GuestRam::new(vec![Block::anonymous("x", 4096).expect("map")]).expect("mem");
        assert_eq!(
            collect_dirty(&vm, &mut DirtyLog::new(&one, 4096)),
            Err(DirtyError::Layout {
                regions: 2,
                blocks: 1
            })
        );
    }
}
