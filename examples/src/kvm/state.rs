//! The vCPU state the source sends after its last round (`Sender::send_state`), in a small
//! explicit binary layout: every field little-endian, in the order written below, after a
//! magic and a version byte. A decoder rejects any other version, a short or overlong buffer,
//! and counts past the fixed bounds.
//!
//! What is carried, and why that is enough for the demo guest:
//! - registers (KVM_GET_REGS), special registers (KVM_GET_SREGS: segments, descriptor
//!   tables, control registers, EFER, APIC base, pending-interrupt bitmap);
//! - the legacy FPU/SSE state (KVM_GET_FPU); the XSAVE area (AVX and up) is not carried: the
//!   guest never sets CR4.OSXSAVE, so no such state can exist;
//! - XCR0 (KVM_GET_XCRS) where KVM has XCRS;
//! - the pending-event state (KVM_GET_VCPU_EVENTS: exception, interrupt and its shadow, NMI,
//!   SIPI vector); SMM and exception-payload state are not carried (the guest has no SMM and
//!   the VMM never enables exception payloads);
//! - the multiprocessing state (KVM_GET_MP_STATE);
//! - the MSRs a long-mode guest may have set that KVM does not keep in sregs (SYSENTER,
//!   SYSCALL, kernel GS base, TSC_AUX, PAT) and the TSC, among those KVM lists.
//!
//! Beside the vCPU, a demo section carries what the destination checks and measures: the
//! layout, the guest's counter at the pause, and when the pause began (CLOCK_MONOTONIC and
//! CLOCK_REALTIME, with the host's boot id so the destination knows whether the monotonic
//! clock is the same one).

use kvm_bindings::{
    kvm_dtable, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcr, kvm_xcrs, Msrs, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

const MAGIC: &[u8; 8] = b"PWKVMST\0";
/// Version of the layout.
pub const VERSION: u8 = 1;
const MAX_XCRS: usize = 16;
const MAX_MSRS: usize = 64;

/// MSRs carried when KVM lists them: SYSENTER_CS/ESP/EIP, PAT, STAR, LSTAR, CSTAR, SFMASK,
/// KERNEL_GS_BASE, TSC_AUX, and the TSC last (restoring it last keeps it closest to the
/// source's value).
const MSRS: [u32; 11] = [
    0x174,
    0x175,
    0x176,
    0x277,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
    0x10,
];

/// What the destination needs besides the vCPU to check and time the migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DemoInfo {
    /// Guest memory bytes.
    pub mem_size: u64,
    /// Working-set pages.
    pub ws_pages: u64,
    /// The guest's counter (status page) when it was paused.
    pub counter: u64,
    /// The source host's boot id (/proc/sys/kernel/random/boot_id).
    pub boot_id: String,
    /// When the pause began, CLOCK_MONOTONIC ns.
    pub pause_mono_ns: u64,
    /// When the pause began, CLOCK_REALTIME ns.
    pub pause_real_ns: u64,
}

/// One vCPU's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: kvm_fpu,
    /// Extended control registers (empty where KVM lacks XCRS).
    pub xcrs: Vec<(u32, u64)>,
    /// Pending events (the fields named in the module docs).
    pub events: kvm_vcpu_events,
    /// KVM_MP_STATE_*.
    pub mp_state: u32,
    /// (index, value) of the MSRs carried.
    pub msrs: Vec<(u32, u64)>,
}

/// What the source sends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Demo facts.
    pub demo: DemoInfo,
    /// vCPU 0.
    pub vcpu: VcpuState,
}

const EVENT_FLAGS: u32 =
    KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR | KVM_VCPUEVENT_VALID_SHADOW;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

impl VcpuState {
    /// Read the state of a stopped vCPU.
    pub fn capture(kvm: &Kvm, fd: &VcpuFd) -> Result<VcpuState, String> {
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let xcrs = if kvm.check_extension(Cap::Xcrs) {
            let x = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
            x.xcrs
                .iter()
                .take((x.nr_xcrs as usize).min(MAX_XCRS))
                .map(|x| (x.xcr, x.value))
                .collect()
        } else {
            Vec::new()
        };
        let mut events = fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.flags &= EVENT_FLAGS;
        let mp_state = fd
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?
            .mp_state;
        let listed = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let listed = listed.as_slice();
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .filter(|i| listed.contains(i))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(format!(
                "KVM_GET_MSRS read {read} of {} MSRs (stopped at {:#x})",
                entries.len(),
                entries.get(read).map_or(0, |e| e.index)
            ));
        }
        let msrs = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xcrs,
            events,
            mp_state,
            msrs,
        })
    }

    /// Load the state into a vCPU that is not running. Special registers go first (they set
    /// the mode the rest is interpreted in); among the MSRs the TSC goes last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), String> {
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        if !self.xcrs.is_empty() {
            let mut x = kvm_xcrs {
                nr_xcrs: self.xcrs.len() as u32,
                ..Default::default()
            };
            for (slot, &(xcr, value)) in x.xcrs.iter_mut().zip(&self.xcrs) {
                *slot = kvm_xcr {
                    xcr,
                    reserved: 0,
                    value,
                };
            }
            fd.set_xcrs(&x).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        fd.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                reserved: 0,
                data,
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let written = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(format!(
                "KVM_SET_MSRS wrote {written} of {} MSRs (refused {:#x})",
                entries.len(),
                entries.get(written).map_or(0, |e| e.index)
            ));
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))
    }
}

/// Serialise a snapshot.
pub fn encode(s: &Snapshot) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(1024));
    w.bytes(MAGIC);
    w.u8(VERSION);
    let d = &s.demo;
    w.u64(d.mem_size);
    w.u64(d.ws_pages);
    w.u64(d.counter);
    w.u16(d.boot_id.len() as u16);
    w.bytes(d.boot_id.as_bytes());
    w.u64(d.pause_mono_ns);
    w.u64(d.pause_real_ns);
    let v = &s.vcpu;
    let r = &v.regs;
    for x in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        w.u64(x);
    }
    let sr = &v.sregs;
    for seg in [
        &sr.cs, &sr.ds, &sr.es, &sr.fs, &sr.gs, &sr.ss, &sr.tr, &sr.ldt,
    ] {
        w.segment(seg);
    }
    for t in [&sr.gdt, &sr.idt] {
        w.u64(t.base);
        w.u16(t.limit);
    }
    for x in [
        sr.cr0,
        sr.cr2,
        sr.cr3,
        sr.cr4,
        sr.cr8,
        sr.efer,
        sr.apic_base,
    ] {
        w.u64(x);
    }
    for x in sr.interrupt_bitmap {
        w.u64(x);
    }
    let f = &v.fpu;
    for reg in &f.fpr {
        w.bytes(reg);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for reg in &f.xmm {
        w.bytes(reg);
    }
    w.u32(f.mxcsr);
    w.u8(v.xcrs.len().min(MAX_XCRS) as u8);
    for &(xcr, value) in v.xcrs.iter().take(MAX_XCRS) {
        w.u32(xcr);
        w.u64(value);
    }
    let e = &v.events;
    w.bytes(&[
        e.exception.injected,
        e.exception.nr,
        e.exception.has_error_code,
        e.exception.pending,
    ]);
    w.u32(e.exception.error_code);
    w.bytes(&[
        e.interrupt.injected,
        e.interrupt.nr,
        e.interrupt.soft,
        e.interrupt.shadow,
    ]);
    w.bytes(&[e.nmi.injected, e.nmi.pending, e.nmi.masked]);
    w.u32(e.sipi_vector);
    w.u32(e.flags & EVENT_FLAGS);
    w.u32(v.mp_state);
    w.u8(v.msrs.len().min(MAX_MSRS) as u8);
    for &(index, value) in v.msrs.iter().take(MAX_MSRS) {
        w.u32(index);
        w.u64(value);
    }
    w.0
}

/// Parse what [`encode`] wrote.
pub fn decode(buf: &[u8]) -> Result<Snapshot, String> {
    let mut r = Reader { buf, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("vCPU state: bad magic (not a pagewire kvm-demo state)".into());
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(format!(
            "vCPU state: version {version}, this build reads version {VERSION}"
        ));
    }
    let mut s = Snapshot::default();
    let d = &mut s.demo;
    d.mem_size = r.u64()?;
    d.ws_pages = r.u64()?;
    d.counter = r.u64()?;
    let n = r.u16()? as usize;
    d.boot_id = String::from_utf8(r.take(n)?.to_vec())
        .map_err(|_| "vCPU state: boot id is not UTF-8".to_string())?;
    d.pause_mono_ns = r.u64()?;
    d.pause_real_ns = r.u64()?;
    let v = &mut s.vcpu;
    let g = &mut v.regs;
    for x in [
        &mut g.rax,
        &mut g.rbx,
        &mut g.rcx,
        &mut g.rdx,
        &mut g.rsi,
        &mut g.rdi,
        &mut g.rsp,
        &mut g.rbp,
        &mut g.r8,
        &mut g.r9,
        &mut g.r10,
        &mut g.r11,
        &mut g.r12,
        &mut g.r13,
        &mut g.r14,
        &mut g.r15,
        &mut g.rip,
        &mut g.rflags,
    ] {
        *x = r.u64()?;
    }
    let sr = &mut v.sregs;
    for seg in [
        &mut sr.cs,
        &mut sr.ds,
        &mut sr.es,
        &mut sr.fs,
        &mut sr.gs,
        &mut sr.ss,
        &mut sr.tr,
        &mut sr.ldt,
    ] {
        *seg = r.segment()?;
    }
    for t in [&mut sr.gdt, &mut sr.idt] {
        *t = kvm_dtable {
            base: r.u64()?,
            limit: r.u16()?,
            ..Default::default()
        };
    }
    for x in [
        &mut sr.cr0,
        &mut sr.cr2,
        &mut sr.cr3,
        &mut sr.cr4,
        &mut sr.cr8,
        &mut sr.efer,
        &mut sr.apic_base,
    ] {
        *x = r.u64()?;
    }
    for x in sr.interrupt_bitmap.iter_mut() {
        *x = r.u64()?;
    }
    let f = &mut v.fpu;
    for reg in f.fpr.iter_mut() {
        reg.copy_from_slice(r.take(16)?);
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.u8()?;
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for reg in f.xmm.iter_mut() {
        reg.copy_from_slice(r.take(16)?);
    }
    f.mxcsr = r.u32()?;
    let n = r.u8()? as usize;
    if n > MAX_XCRS {
        return Err(format!("vCPU state: {n} XCRs (at most {MAX_XCRS})"));
    }
    for _ in 0..n {
        v.xcrs.push((r.u32()?, r.u64()?));
    }
    let e = &mut v.events;
    e.exception.injected = r.u8()?;
    e.exception.nr = r.u8()?;
    e.exception.has_error_code = r.u8()?;
    e.exception.pending = r.u8()?;
    e.exception.error_code = r.u32()?;
    e.interrupt.injected = r.u8()?;
    e.interrupt.nr = r.u8()?;
    e.interrupt.soft = r.u8()?;
    e.interrupt.shadow = r.u8()?;
    e.nmi.injected = r.u8()?;
    e.nmi.pending = r.u8()?;
    e.nmi.masked = r.u8()?;
    e.sipi_vector = r.u32()?;
    e.flags = r.u32()?;
    if e.flags & !EVENT_FLAGS != 0 {
        return Err(format!(
            "vCPU state: event flags {:#x} not supported",
            e.flags
        ));
    }
    v.mp_state = r.u32()?;
    let n = r.u8()? as usize;
    if n > MAX_MSRS {
        return Err(format!("vCPU state: {n} MSRs (at most {MAX_MSRS})"));
    }
    for _ in 0..n {
        v.msrs.push((r.u32()?, r.u64()?));
    }
    if r.at != buf.len() {
        return Err(format!(
            "vCPU state: {} bytes left over after the last field",
            buf.len() - r.at
        ));
    }
    Ok(s)
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.bytes(&x.to_le_bytes());
    }
    fn u32(&mut self, x: u32) {
        self.bytes(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }
    fn segment(&mut self, s: &kvm_segment) {
        self.u64(s.base);
        self.u32(s.limit);
        self.u16(s.selector);
        self.bytes(&[
            s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
        ]);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(format!(
                "vCPU state: truncated at byte {} of {}",
                self.at,
                self.buf.len()
            ));
        };
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn segment(&mut self) -> Result<kvm_segment, String> {
        let base = self.u64()?;
        let limit = self.u32()?;
        let selector = self.u16()?;
        let [type_, present, dpl, db, s, l, g, avl, unusable] = self.arr::<9>()?;
        Ok(kvm_segment {
            base,
            limit,
            selector,
            type_,
            present,
            dpl,
            db,
            s,
            l,
            g,
            avl,
            unusable,
            padding: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot {
            demo: DemoInfo {
                mem_size: 64 << 20,
                ws_pages: 4096,
                counter: 123_456,
                boot_id: "0b1d2e3f-aaaa-bbbb-cccc-000000000001".into(),
                pause_mono_ns: 42,
                pause_real_ns: 1_700_000_000_000_000_000,
            },
            vcpu: VcpuState::default(),
        };
        let v = &mut s.vcpu;
        v.regs = super::super::guest::boot_regs(
            &super::super::guest::Layout::new(64 << 20, 4096).expect("layout"),
        );
        v.regs.r9 = 0xdead_beef_f00d;
        v.sregs = super::super::guest::boot_sregs(kvm_sregs::default());
        v.sregs.interrupt_bitmap[3] = 1 << 63;
        v.fpu.fcw = 0x37f;
        v.fpu.mxcsr = 0x1f80;
        v.fpu.xmm[15][15] = 0xee;
        v.fpu.fpr[7][9] = 0x11;
        v.xcrs = vec![(0, 1)];
        v.events.interrupt.shadow = 1;
        v.events.flags = KVM_VCPUEVENT_VALID_SHADOW;
        v.mp_state = 0;
        v.msrs = vec![(0x277, 0x0007_0406_0007_0406), (0x10, 99)];
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes).expect("decode"), s);
    }

    #[test]
    fn rejects_bad_input() {
        let bytes = encode(&sample());
        for cut in [0, 8, 9, 100, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).expect_err("longer").contains("left over"));
        let mut other = bytes.clone();
        other[8] = VERSION + 1;
        assert!(decode(&other).expect_err("version").contains("version"));
        let mut magic = bytes;
        magic[0] ^= 1;
        assert!(decode(&magic).expect_err("magic").contains("magic"));
    }
}
