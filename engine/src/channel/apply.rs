//! Applying a validated packet to guest memory: where its payload goes, then inflating the
//! compressed pages and zeroing the zero pages. Shared by the io_uring receiver and the
//! offline decoder, so both apply packets identically.

use pagewire_transport::wire::{Compression, PacketHeader};

use crate::codec::{is_zero_page, CodecError, PageDecompressor};
use crate::fresh::FreshMap;
use crate::memory::GuestRam;
use crate::stats::ChannelStats;

/// A page that failed to apply.
#[derive(Debug)]
pub struct ApplyError {
    pub page: usize,
    pub offset: u64,
    pub source: CodecError,
}

/// Build the payload's destination iovecs, in wire order: a raw page goes straight to its
/// guest page, a compressed page to the next `zlen` bytes of `zbuf`. Adjacent destinations
/// are merged. `zlens` is `None` for the `none` framing.
///
/// The header must have been validated against this memory's layout (block index valid,
/// every offset inside the block) and the zlens against the page size; anything else is a
/// bug and returns `false` (nothing is written).
pub fn payload_iovecs(
    mem: &GuestRam,
    header: &PacketHeader,
    zlens: Option<&[u32]>,
    page_size: u32,
    zbuf: &mut [u8],
    iov: &mut Vec<libc::iovec>,
) -> bool {
    iov.clear();
    let Some(block) = mem.block(header.block) else {
        return false;
    };
    let ps = page_size as usize;
    let mut zpos = 0usize;
    for (i, &off) in header.normal_offsets().iter().enumerate() {
        let (ptr, len) = match zlens.map(|z| z.get(i).copied()) {
            Some(None) => return false,
            Some(Some(zlen)) if zlen as usize != ps => {
                let len = zlen as usize;
                let Some(dst) = zbuf.get_mut(zpos..zpos + len) else {
                    return false;
                };
                zpos += len;
                (dst.as_mut_ptr(), len)
            }
            _ => match block.range_ptr(off, ps) {
                Some(p) => (p, ps),
                None => return false,
            },
        };
        match iov.last_mut() {
            Some(last) if (last.iov_base as *mut u8).wrapping_add(last.iov_len) == ptr => {
                last.iov_len += len
            }
            _ => iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            }),
        }
    }
    true
}

/// After the payload has landed: inflate every compressed page from `zbuf` into its guest
/// page and zero every zero page that is not already zero. Counts pages into `stats`.
///
/// `fresh`: the map of pages this session has written, when the memory was all zero at the
/// start (receiver-allocated); a zero page still fresh is left untouched (not even read). The
/// packet's normal pages were claimed in it before their data landed.
/// `None`: nothing is known of the memory, every zero page is checked.
#[allow(clippy::too_many_arguments)] // the receiver's and the decoder's buffers, passed as they own them
pub fn finish_packet(
    mem: &GuestRam,
    header: &PacketHeader,
    compression: Compression,
    zlens: &[u32],
    page_size: u32,
    zbuf: &[u8],
    decomp: &mut dyn PageDecompressor,
    stats: &mut ChannelStats,
    fresh: Option<&FreshMap>,
) -> Result<(), ApplyError> {
    let Some(block) = mem.block(header.block) else {
        return Err(ApplyError {
            page: 0,
            offset: 0,
            source: CodecError::Setting("block index out of range".into()),
        });
    };
    let ps = page_size as usize;
    let oob = |page, offset| ApplyError {
        page,
        offset,
        source: CodecError::Setting("page outside its block".into()),
    };
    if compression == Compression::Qpl {
        let mut zpos = 0usize;
        for (i, &off) in header.normal_offsets().iter().enumerate() {
            let zlen = zlens.get(i).copied().unwrap_or(page_size) as usize;
            if zlen == ps {
                stats.pages_raw += 1;
                continue;
            }
            let input = zbuf.get(zpos..zpos + zlen).ok_or_else(|| oob(i, off))?;
            zpos += zlen;
            let dst = block.range_ptr(off, ps).ok_or_else(|| oob(i, off))?;
            // SAFETY: `dst..dst+ps` is inside the block (range_ptr checked), which stays
            // mapped while `mem` lives. The round barrier guarantees no other channel writes
            // this page now unless the peer sent the same page twice in one round (then that
            // page's content is garbage, as the peer asked, but nothing outside guest memory
            // is touched).
            let out = unsafe { std::slice::from_raw_parts_mut(dst, ps) };
            decomp.decompress(input, out).map_err(|source| ApplyError {
                page: i,
                offset: off,
                source,
            })?;
            stats.pages_compressed += 1;
        }
    } else {
        stats.pages_raw += header.normal_pages as u64;
    }
    for (j, &off) in header.zero_offsets().iter().enumerate() {
        if fresh.is_some_and(|f| f.is_fresh(header.block, off)) {
            // Still as allocated: all zero, and never faulted in.
            stats.pages_zero_unread += 1;
            continue;
        }
        let dst = block
            .range_ptr(off, ps)
            .ok_or_else(|| oob(header.normal_pages as usize + j, off))?;
        // SAFETY: inside the block (checked) and mapped; see above for concurrent writers.
        let page = unsafe { std::slice::from_raw_parts_mut(dst, ps) };
        if !is_zero_page(page) {
            page.fill(0);
        }
    }
    stats.packets += 1;
    stats.pages_normal += header.normal_pages as u64;
    stats.pages_zero += header.zero_pages as u64;
    stats.memory_bytes +=
        (header.normal_pages as u64 + header.zero_pages as u64) * page_size as u64;
    Ok(())
}
