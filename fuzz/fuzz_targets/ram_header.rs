//! RAM packet header: `PacketHeader::decode_into` against fixed session rules, then
//! `decode_zlens` on the bytes after the header.
//!
//! Input: byte 0 selects the session's compression; the next `header_len(8)` = 384 bytes (or
//! fewer, to exercise the length check) are the header; the rest is a qpl length array.
//!
//! Properties, for any input: no panic; an accepted header obeys every rule of
//! docs/wire-format.md §2.2 (pages_alloc, normal + zero <= pages_alloc, SYNC without pages,
//! compression, next_packet_size framing, known block, offsets page-aligned and inside the
//! block); re-encoding it with `encode_header` and decoding again gives the same header and
//! the same bytes in every field the decoder reads; an accepted length array obeys §2.3 and
//! re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagewire_transport::wire::{
    decode_zlens, encode_header, encode_zlens, header_len, BlockSpec, Compression, HeaderFields,
    HeaderRules, PacketHeader, FLAG_SYNC, HEADER_FIXED_LEN,
};

const PAGE_SIZE: u32 = 4096;
const PPP: u32 = 8;

fn blocks() -> [BlockSpec; 2] {
    [
        BlockSpec {
            name: "pc.ram".into(),
            size: 16 * u64::from(PAGE_SIZE),
        },
        BlockSpec {
            name: "vga".into(),
            size: 3 * u64::from(PAGE_SIZE),
        },
    ]
}

fn compression(sel: u8) -> Compression {
    match sel % 8 {
        0 | 6 => Compression::None,
        1 => Compression::Zlib,
        2 => Compression::Zstd,
        4 => Compression::Uadk,
        5 => Compression::Qatzip,
        _ => Compression::Qpl,
    }
}

fn check_rules(h: &PacketHeader, buf: &[u8], rules: &HeaderRules<'_>) {
    let ps = u64::from(rules.page_size);
    let normal = u64::from(h.normal_pages);
    let pages = normal + u64::from(h.zero_pages);
    assert!(
        h.pages_alloc == PPP || (h.is_sync() && h.pages_alloc == 0),
        "pages_alloc {} accepted",
        h.pages_alloc
    );
    assert!(
        pages <= u64::from(h.pages_alloc),
        "normal + zero > pages_alloc"
    );
    assert_eq!(h.offsets.len() as u64, pages, "offsets vs page counts");
    if h.is_sync() {
        assert_eq!(pages, 0, "SYNC with pages accepted");
    }
    let found = Compression::from_flags(h.flags).expect("accepted flags have a compression");
    assert_eq!(
        h.flags & !0x3F,
        0,
        "unknown or device-state flag bits accepted"
    );
    if pages == 0 {
        assert_eq!(h.next_packet_size, 0, "payload on a packet without pages");
        return;
    }
    assert_eq!(
        found, rules.compression,
        "compression differs from the session's"
    );
    let n = u64::from(h.next_packet_size);
    match found {
        Compression::None => assert_eq!(n, normal * ps),
        Compression::Qpl | Compression::Uadk => {
            assert!(n >= 4 * normal && n <= 4 * normal + normal * ps)
        }
        _ => assert!(n <= 2 * normal * ps + ps),
    }
    let block = rules.blocks.get(h.block).expect("block index in range");
    let name = &buf[64..64 + block.name.len() + 1];
    assert_eq!(
        &name[..block.name.len()],
        block.name.as_bytes(),
        "block name"
    );
    assert_eq!(name[block.name.len()], 0, "block name not NUL-terminated");
    for &off in &h.offsets {
        assert_eq!(off % ps, 0, "unaligned offset {off:#x} accepted");
        assert!(off + ps <= block.size, "offset {off:#x} past block");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let blocks = blocks();
    let rules = HeaderRules {
        page_size: PAGE_SIZE,
        pages_per_packet: PPP,
        compression: compression(sel),
        blocks: &blocks,
    };
    let hlen = header_len(PPP);
    // A short input is passed whole (length check); a long one is split into header + tail.
    // Bit 3 of the selector passes one byte too many instead, to exercise the exact check.
    let (buf, tail) = if rest.len() > hlen && sel & 8 != 0 {
        (&rest[..=hlen], &rest[hlen + 1..])
    } else {
        rest.split_at(rest.len().min(hlen))
    };
    // A header object that already holds state, as the receiver's reused one does.
    let mut h = PacketHeader {
        block: usize::from(sel >> 7),
        offsets: vec![0xdead_beef; 3],
        ..Default::default()
    };
    match h.decode_into(buf, &rules) {
        Ok(()) => {
            assert_eq!(buf.len(), hlen, "accepted a header of the wrong length");
            check_rules(&h, buf, &rules);
            // Re-encode: same header and same bytes in every field the decoder reads.
            let fields = HeaderFields {
                flags: h.flags,
                pages_alloc: h.pages_alloc,
                normal_pages: h.normal_pages,
                next_packet_size: h.next_packet_size,
                packet_num: h.packet_num,
                zero_pages: h.zero_pages,
            };
            let pages = h.offsets.len();
            let name = if pages == 0 {
                ""
            } else {
                blocks[h.block].name.as_str()
            };
            let mut enc = vec![0u8; header_len(h.pages_alloc)];
            encode_header(&mut enc, &fields, name, &h.offsets);
            // A SYNC with pages_alloc 0 is still sent at the session's full header length.
            enc.resize(hlen, 0);
            assert_eq!(enc[..36], buf[..36], "fixed fields re-encode differently");
            let used = HEADER_FIXED_LEN..HEADER_FIXED_LEN + 8 * pages;
            assert_eq!(
                enc[used.clone()],
                buf[used],
                "offsets re-encode differently"
            );
            let mut again = PacketHeader::default();
            again
                .decode_into(&enc, &rules)
                .expect("a re-encoded accepted header decodes");
            assert_eq!(again, h, "header round trip");

            if matches!(h.flags & 0x3E, 0x08 | 0x10) && h.flags & FLAG_SYNC == 0 {
                let arr = tail
                    .get(..4 * pages.min(h.normal_pages as usize))
                    .unwrap_or(tail);
                zlens(arr, h.normal_pages, h.next_packet_size);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // The length array on its own, on whatever follows: first 4 bytes next_packet_size, then
    // as many lengths as fit (a ragged tail exercises the length check).
    if let Some((nps, arr)) = tail.split_first_chunk::<4>() {
        let normal = (arr.len() / 4 + usize::from(sel & 0x10 != 0)) as u32;
        zlens(arr, normal, u32::from_be_bytes(*nps));
    }
});

fn zlens(buf: &[u8], normal: u32, next_packet_size: u32) {
    let mut out = vec![7u32; 2];
    match decode_zlens(buf, normal, PAGE_SIZE, next_packet_size, &mut out) {
        Ok(sum) => {
            assert_eq!(out.len(), normal as usize);
            assert_eq!(buf.len(), 4 * out.len());
            assert!(
                out.iter().all(|&z| (1..=PAGE_SIZE).contains(&z)),
                "zlen out of range"
            );
            assert_eq!(sum, out.iter().map(|&z| u64::from(z)).sum::<u64>());
            assert_eq!(4 * u64::from(normal) + sum, u64::from(next_packet_size));
            let mut enc = vec![0u8; 4 * out.len()];
            encode_zlens(&mut enc, &out);
            assert_eq!(enc, buf, "length array round trip");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
