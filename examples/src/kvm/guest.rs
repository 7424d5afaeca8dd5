//! The demo guest: its memory layout, boot image and boot vCPU state, and the checks the
//! destination runs on its memory.
//!
//! The guest has no kernel. It boots straight into ring 3 of 64-bit long mode (identity-mapped
//! with 2 MiB pages, every page user-accessible) because on hosts without hardware
//! virtualisation KVM emulates ring-0 guest code instruction by instruction, while ring-3 code
//! of a long-mode guest runs natively. Its program (`guest.asm`) rewrites a working set of
//! pages one page per iteration, keeping a counter and a running checksum of the working set,
//! and exits to the VMM once per pass over the working set (a store to [`CHECKPOINT_MMIO`],
//! where there is no memory), the only VM exit it makes. At that exit memory is consistent with the counter: the destination checks every
//! working-set page and the checksum there.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use pagewire::GuestRam;

/// Guest page size (and pagewire's page size).
pub const PAGE: u64 = 4096;
/// The GDT: null, kernel code, kernel data, user data, user code, TSS (two slots).
pub const GDT: u64 = 0x1000;
/// The 64-bit TSS (the CPU needs a valid task register even if nothing switches stacks).
pub const TSS: u64 = 0x2000;
/// Top-level page table.
pub const PML4: u64 = 0x3000;
/// Page-directory-pointer table (one entry per GiB).
pub const PDPT: u64 = 0x4000;
/// Page directory of the GiB holding the checkpoint page ([`CHECKPOINT_MMIO`]).
pub const PD_MMIO: u64 = 0x5000;
/// Status page: `[0]` counter, `[1]` checksum, as the guest last stored them.
pub const STATUS: u64 = 0x6000;
/// Top of the (unused) stack.
pub const STACK_TOP: u64 = 0x9000;
/// Guest program.
pub const CODE: u64 = 0x10000;
/// Page directories, one per GiB of guest memory, 2 MiB pages.
pub const PDS: u64 = 0x20000;
/// Most guest memory: below the checkpoint page.
pub const MAX_MEMORY: u64 = 3 << 30;
/// First working-set page.
pub const WS_BASE: u64 = 16 << 20;
/// Guest physical address of the once-per-pass checkpoint store: mapped by the guest's page
/// tables, backed by no memory slot, so the store exits to the VMM as MMIO (with the counter
/// as its data).
pub const CHECKPOINT_MMIO: u64 = 0xC000_0000;

const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;
const TSS_LIMIT: u32 = 0x67;

/// The seed multiplier and LCG of `guest.asm`.
const SEED_K: u64 = 0x9E37_79B9_7F4A_7C15;
const LCG_A: u64 = 6364136223846793005;
const LCG_C: u64 = 1442695040888963407;
/// u64 words per page.
pub const WORDS: usize = (PAGE / 8) as usize;

/// `guest.asm`, assembled (`nasm -f bin`), loaded at [`CODE`].
pub const GUEST_CODE: [u8; 128] = [
    0x4c, 0x89, 0xef, 0x48, 0xc1, 0xe7, 0x0c, 0x4c, 0x01, 0xd7, 0x49, 0x8d, 0x40, 0x01, 0x48, 0xbb,
    0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, 0x48, 0x0f, 0xaf, 0xc3, 0x48, 0xbb, 0x2d, 0x7f,
    0x95, 0x4c, 0x2d, 0xf4, 0x51, 0x58, 0x48, 0xba, 0x4f, 0x81, 0x67, 0xf7, 0x7e, 0x7b, 0x05, 0x14,
    0x31, 0xf6, 0x45, 0x31, 0xf6, 0xb9, 0x00, 0x02, 0x00, 0x00, 0x4c, 0x03, 0x37, 0x48, 0x0f, 0xaf,
    0xc3, 0x48, 0x01, 0xd0, 0x49, 0x89, 0xc7, 0x49, 0xc1, 0xef, 0x28, 0x4c, 0x89, 0x3f, 0x4c, 0x01,
    0xfe, 0x48, 0x83, 0xc7, 0x08, 0xff, 0xc9, 0x75, 0xe1, 0x4d, 0x29, 0xf1, 0x49, 0x01, 0xf1, 0x49,
    0xff, 0xc0, 0x4d, 0x89, 0x04, 0x24, 0x4d, 0x89, 0x4c, 0x24, 0x08, 0x49, 0xff, 0xc5, 0x4d, 0x39,
    0xdd, 0x72, 0x8d, 0x45, 0x31, 0xed, 0xbf, 0x00, 0x00, 0x00, 0xc0, 0x4c, 0x89, 0x07, 0xeb, 0x80,
];

/// Guest memory size and working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of guest memory (one memory slot at guest physical address 0).
    pub mem_size: u64,
    /// Pages the guest keeps rewriting, from [`WS_BASE`].
    pub ws_pages: u64,
}

impl Layout {
    /// Check that the sizes fit the boot image's layout.
    pub fn new(mem_size: u64, ws_pages: u64) -> Result<Layout, String> {
        if mem_size == 0 || mem_size % (2 << 20) != 0 || mem_size > MAX_MEMORY {
            return Err(format!(
                "guest memory of {mem_size} bytes: must be a non-zero multiple of 2 MiB, at most 3 GiB"
            ));
        }
        let end = ws_pages
            .checked_mul(PAGE)
            .and_then(|b| b.checked_add(WS_BASE));
        match end {
            Some(end) if ws_pages > 0 && end <= mem_size => Ok(Layout { mem_size, ws_pages }),
            _ => Err(format!(
                "a working set of {ws_pages} pages from 16 MiB does not fit {} MiB of guest memory",
                mem_size >> 20
            )),
        }
    }

    /// Guest memory size in bytes as a `usize`.
    pub fn size(&self) -> Result<usize, String> {
        usize::try_from(self.mem_size).map_err(|_| "guest memory too large".to_string())
    }
}

/// Write the boot image (GDT, TSS, page tables, program) into zeroed guest memory.
pub fn write_boot_image(mem: &mut [u8], layout: &Layout) -> Result<(), String> {
    if (mem.len() as u64) < layout.mem_size {
        return Err("guest memory smaller than its layout".into());
    }
    let mut put = |addr: u64, v: u64| -> Result<(), String> {
        let a = usize::try_from(addr).map_err(|_| "address overflow".to_string())?;
        mem.get_mut(a..a + 8)
            .ok_or_else(|| format!("boot image write at {addr:#x} outside guest memory"))?
            .copy_from_slice(&v.to_le_bytes());
        Ok(())
    };
    // GDT.
    put(GDT, 0)?;
    put(GDT + 0x08, 0x00af_9b00_0000_ffff)?; // kernel code, 64-bit (unused)
    put(GDT + 0x10, 0x00cf_9300_0000_ffff)?; // kernel data (unused)
    put(GDT + 0x18, 0x00cf_f300_0000_ffff)?; // user data, DPL 3
    put(GDT + 0x20, 0x00af_fb00_0000_ffff)?; // user code, 64-bit, DPL 3
    let (lo, hi) = tss_descriptor(TSS, TSS_LIMIT);
    put(GDT + 0x28, lo)?;
    put(GDT + 0x30, hi)?;
    // TSS: rsp0 (offset 4) for completeness; I/O map base (offset 0x66) past the limit, so no
    // I/O bitmap: IOPL 3 in RFLAGS is what lets ring 3 use `out`.
    put(TSS + 4, STACK_TOP)?;
    put(TSS + 0x60, 0x0068_0000_0000_0000)?;
    // Page tables: present, writable, user-accessible; 2 MiB pages identity-mapping memory.
    const PTE: u64 = 0x7;
    const LARGE: u64 = 0x80;
    put(PML4, PDPT | PTE)?;
    let gib = layout.mem_size.div_ceil(1 << 30);
    for g in 0..gib {
        put(PDPT + g * 8, (PDS + g * PAGE) | PTE)?;
    }
    for i in 0..layout.mem_size / (2 << 20) {
        put(PDS + i * 8, (i * (2 << 20)) | PTE | LARGE)?;
    }
    // The checkpoint page, in its own GiB.
    put(PDPT + (CHECKPOINT_MMIO >> 30) * 8, PD_MMIO | PTE)?;
    put(PD_MMIO, CHECKPOINT_MMIO | PTE | LARGE)?;
    let code = usize::try_from(CODE).map_err(|_| "address overflow".to_string())?;
    mem.get_mut(code..code + GUEST_CODE.len())
        .ok_or("guest program outside guest memory")?
        .copy_from_slice(&GUEST_CODE);
    Ok(())
}

fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let limit = limit as u64;
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, DPL 0, type 0xb (busy 64-bit TSS)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot special registers: long mode, paging, CPL 3.
pub fn boot_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(SEL_USER_CODE, true);
    let data = segment(SEL_USER_DATA, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: GDT,
        limit: 7 * 8 - 1,
        ..Default::default()
    };
    // No IDT: the guest takes no interrupts, and any exception ends in a triple fault, which
    // the VMM reports as the guest's failure (KVM_EXIT_SHUTDOWN).
    s.idt = kvm_dtable::default();
    s.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LME, LMA
    s
}

/// The boot registers: the program's entry, IOPL 3, and its register arguments.
pub fn boot_regs(layout: &Layout) -> kvm_regs {
    kvm_regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 0x2 | (3 << 12),
        r8: 0,
        r9: 0,
        r10: WS_BASE,
        r11: layout.ws_pages,
        r12: STATUS,
        r13: 0,
        ..Default::default()
    }
}

/// What iteration `c` writes into its page (exactly what `guest.asm` computes).
pub fn page_words(c: u64, out: &mut [u64; WORDS]) {
    let mut v = c.wrapping_add(1).wrapping_mul(SEED_K);
    for w in out.iter_mut() {
        v = v.wrapping_mul(LCG_A).wrapping_add(LCG_C);
        *w = v >> 40;
    }
}

/// Read a u64 of guest memory.
///
/// # Safety
/// The guest must not be running (every vCPU stopped) and no receiver may be writing the
/// memory.
unsafe fn read_u64(mem: &GuestRam, addr: u64) -> Result<u64, String> {
    let p = mem
        .block(0)
        .and_then(|b| b.range_ptr(addr, 8))
        .ok_or_else(|| format!("guest address {addr:#x} outside guest memory"))?;
    // SAFETY: `range_ptr` checked that the 8 bytes are inside the mapping; the caller
    // guarantees nothing writes them meanwhile. Unaligned reads are allowed.
    Ok(unsafe { std::ptr::read_unaligned(p as *const u64) })
}

/// The guest's status page: (counter, checksum) as it last stored them.
///
/// # Safety
/// As [`read_u64`]: the guest is stopped and no receiver writes the memory.
pub unsafe fn status(mem: &GuestRam) -> Result<(u64, u64), String> {
    // SAFETY: forwarded contract.
    unsafe { Ok((read_u64(mem, STATUS)?, read_u64(mem, STATUS + 8)?)) }
}

/// What a check of the working set found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checked {
    /// Working-set pages compared word for word.
    pub pages: u64,
    /// Wrapping sum of every word of the working set.
    pub sum: u64,
}

/// Compare every working-set page with what the guest must have written given `counter`
/// iterations done, except page `skip` (one being rewritten when the guest was stopped
/// mid-iteration). A page never written yet must be zero.
///
/// # Safety
/// As [`read_u64`]: the guest is stopped and no receiver writes the memory.
pub unsafe fn check_working_set(
    mem: &GuestRam,
    layout: &Layout,
    counter: u64,
    skip: Option<u64>,
) -> Result<Checked, String> {
    let block = mem.block(0).ok_or("no guest memory block")?;
    let ws_len = usize::try_from(layout.ws_pages * PAGE).map_err(|_| "working set too large")?;
    let p = block
        .range_ptr(WS_BASE, ws_len)
        .ok_or("working set outside guest memory")?;
    // SAFETY: `range_ptr` checked the range is inside the mapping; the caller guarantees
    // nothing writes it while this shared view lives (the guest is stopped). WS_BASE is
    // page-aligned and so is the mapping, so the u64 view is aligned.
    let ws = unsafe { std::slice::from_raw_parts(p as *const u64, ws_len / 8) };
    let n = layout.ws_pages;
    let mut expect = [0u64; WORDS];
    let mut out = Checked::default();
    for (page, words) in (0..n).zip(ws.chunks_exact(WORDS)) {
        out.sum = words.iter().fold(out.sum, |a, w| a.wrapping_add(*w));
        if skip == Some(page) {
            continue;
        }
        // The last iteration that wrote this page: the largest c < counter with c % n == page.
        let last = if counter > page {
            Some(page + (counter - 1 - page) / n * n)
        } else {
            None
        };
        match last {
            Some(c) => page_words(c, &mut expect),
            None => expect = [0; WORDS],
        }
        if let Some(i) = words.iter().zip(expect.iter()).position(|(a, b)| a != b) {
            return Err(format!(
                "working-set page {page} word {i} is {:#x}, expected {:#x} (written by iteration {})",
                words[i],
                expect[i],
                last.map_or("none".to_string(), |c| c.to_string()),
            ));
        }
        out.pages += 1;
    }
    Ok(out)
}

/// The full check at a checkpoint exit (the guest stopped at its MMIO store after a pass): every
/// page matches the counter, the checksum the guest kept (in memory and in r9) equals the sum
/// of the working set, and the registers agree with the status page. Returns the counter.
///
/// # Safety
/// As [`read_u64`]: the guest is stopped and no receiver writes the memory.
pub unsafe fn check_at_checkpoint(
    mem: &GuestRam,
    layout: &Layout,
    regs: &kvm_regs,
) -> Result<(u64, Checked), String> {
    // SAFETY: forwarded contract.
    let (counter, checksum) = unsafe { status(mem)? };
    if regs.r8 != counter || regs.r9 != checksum || regs.r13 != 0 {
        return Err(format!(
            "registers disagree with the status page at a checkpoint: r8 {} r9 {:#x} r13 {}, status counter {counter} checksum {checksum:#x}",
            regs.r8, regs.r9, regs.r13
        ));
    }
    if counter == 0 || counter % layout.ws_pages != 0 {
        return Err(format!(
            "checkpoint with counter {counter}, not a whole number of passes over {} pages",
            layout.ws_pages
        ));
    }
    // SAFETY: forwarded contract.
    let checked = unsafe { check_working_set(mem, layout, counter, None)? };
    if checked.sum != checksum {
        return Err(format!(
            "the guest's checksum {checksum:#x} does not match its working set (sum {:#x})",
            checked.sum
        ));
    }
    Ok((counter, checked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagewire::Block;

    #[test]
    fn layout_limits() {
        assert!(Layout::new(64 << 20, 4096).is_ok());
        assert!(Layout::new(32 << 20, 4096).is_ok());
        assert!(Layout::new(32 << 20, 4097).is_err());
        assert!(Layout::new(3 << 20, 1).is_err());
        assert!(Layout::new(64 << 20, 0).is_err());
    }

    /// The guest's program, run by hand (what `guest.asm` does), passes the checks.
    #[test]
    fn checks_accept_a_simulated_guest_and_catch_a_stale_page() {
        let layout = Layout::new(18 << 20, 8).expect("layout");
        let block = Block::anonymous("pc.ram", 18 << 20).expect("block");
        let mem = GuestRam::new(vec![block]).expect("mem");
        // SAFETY: nothing else uses this memory.
        let bytes = unsafe { mem.block(0).expect("b").as_mut_slice() };
        write_boot_image(bytes, &layout).expect("boot image");
        let (mut counter, mut checksum) = (0u64, 0u64);
        let mut words = [0u64; WORDS];
        for _ in 0..20 {
            let page = counter % layout.ws_pages;
            let at = (WS_BASE + page * PAGE) as usize;
            page_words(counter, &mut words);
            for (i, w) in words.iter().enumerate() {
                let cell = &mut bytes[at + i * 8..at + i * 8 + 8];
                let old = u64::from_le_bytes(cell.try_into().expect("8"));
                checksum = checksum.wrapping_sub(old).wrapping_add(*w);
                cell.copy_from_slice(&w.to_le_bytes());
            }
            counter += 1;
        }
        let s = STATUS as usize;
        bytes[s..s + 8].copy_from_slice(&counter.to_le_bytes());
        bytes[s + 8..s + 16].copy_from_slice(&checksum.to_le_bytes());
        // 20 is not a whole number of passes over 8 pages: check the pages alone.
        // SAFETY: nothing writes the memory.
        let c = unsafe { check_working_set(&mem, &layout, counter, None) }.expect("pages");
        assert_eq!((c.pages, c.sum), (8, checksum));
        let regs = kvm_regs {
            r8: counter,
            r9: checksum,
            ..Default::default()
        };
        // SAFETY: nothing writes the memory.
        assert!(unsafe { check_at_checkpoint(&mem, &layout, &regs) }.is_err());
        // A page left as an older iteration wrote it is caught.
        // SAFETY: nothing writes the memory.
        let c = unsafe { check_working_set(&mem, &layout, counter + 1, None) };
        assert!(c.is_err());
        // SAFETY: nothing writes the memory.
        let c = unsafe { check_working_set(&mem, &layout, counter + 1, Some(counter % 8)) };
        assert!(c.is_ok());
    }

    /// `GUEST_CODE` is `guest.asm` assembled (checked where nasm is installed).
    #[test]
    fn guest_code_matches_its_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("guest.bin");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kvm/guest.asm");
        let status = std::process::Command::new("nasm")
            .args(["-f", "bin", "-o"])
            .arg(&out)
            .arg(src)
            .status();
        match status {
            Ok(s) if s.success() => {
                let bin = std::fs::read(&out).expect("read");
                assert_eq!(bin, GUEST_CODE, "guest.rs is out of date with guest.asm");
            }
            _ => eprintln!("SKIP guest_code_matches_its_source: nasm not installed"),
        }
    }
}
