//! Letting go of the program's read-only pages once they have been used.
//!
//! The kernel maps a binary's code and read-only data into a process on first touch, 64 KiB
//! around each fault, and leaves them mapped (and counted in its RSS) until memory runs short.
//! A daemon runs most of its code once: argument parsing, start-up, enrollment, the first
//! handshake and netmap. [`release_read_only_pages`] drops the process's own mappings of the
//! clean pages of every loaded object (the program and its shared libraries): the page cache
//! keeps them, other processes keep theirs, and what the daemon runs again is mapped again by a
//! minor fault. What stays resident is the code the daemon keeps running.
//!
//! Only segments that were never writable are touched, never a RELRO range (its pages hold
//! relocated pointers, private copies that `MADV_DONTNEED` would turn back into the file's
//! bytes), never an object with text relocations (the loader wrote into its code). A process
//! under a debugger is left alone: a breakpoint is a private copy of a code page too.

/// A loaded object's segment, as its program header describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// `PT_LOAD`, `PT_GNU_RELRO`, …
    pub kind: u32,
    /// `PF_R` | `PF_W` | `PF_X`.
    pub flags: u32,
    /// Run-time start address (the object's load address plus `p_vaddr`).
    pub start: usize,
    /// Size in memory (`p_memsz`).
    pub len: usize,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_GNU_RELRO: u32 = 0x6474_e552;
const PF_W: u32 = 2;
const DT_NULL: u64 = 0;
const DT_TEXTREL: u64 = 22;
const DT_FLAGS: u64 = 30;
const DF_TEXTREL: u64 = 4;

/// Whether an object's dynamic entries (tag, value) ask for text relocations: the loader then
/// wrote into its code, whose pages are private copies.
pub fn text_relocations(entries: impl IntoIterator<Item = (u64, u64)>) -> bool {
    for (tag, value) in entries {
        match tag {
            DT_NULL => break,
            DT_TEXTREL => return true,
            DT_FLAGS if value & DF_TEXTREL != 0 => return true,
            _ => {}
        }
    }
    false
}

/// The whole pages of `segments` (one object's program headers) that were never writable and
/// lie outside every RELRO range: `[start, end)` pairs, aligned inward to `page`.
pub fn read_only_ranges(segments: &[Segment], page: usize) -> Vec<(usize, usize)> {
    if page == 0 || !page.is_power_of_two() {
        return Vec::new();
    }
    let relro: Vec<(usize, usize)> = segments
        .iter()
        .filter(|s| s.kind == PT_GNU_RELRO)
        .map(|s| {
            let end = s.start.saturating_add(s.len);
            (
                s.start & !(page - 1),
                end.saturating_add(page - 1) & !(page - 1),
            )
        })
        .collect();
    segments
        .iter()
        .filter(|s| s.kind == PT_LOAD && s.flags & PF_W == 0)
        .filter_map(|s| {
            let start = s.start.checked_add(page - 1)? & !(page - 1);
            let end = s.start.checked_add(s.len)? & !(page - 1);
            (start < end).then_some((start, end))
        })
        .filter(|&(start, end)| relro.iter().all(|&(a, b)| end <= a || b <= start))
        .collect()
}

/// Drops this process's mappings of the clean read-only pages of every loaded object (see the
/// module doc) and returns how many bytes of address space were advised. Does nothing (0)
/// under a debugger, off Linux, or when the kernel refuses the advice (a locked range).
pub fn release_read_only_pages() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    {
        if traced() {
            return 0;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else {
            return 0;
        };
        let mut objects: Vec<Vec<Segment>> = Vec::new();
        // SAFETY: the callback only reads the `dl_phdr_info` glibc passes it (valid for the
        // call) and pushes into the Vec behind `data`, which outlives the iteration.
        unsafe {
            libc::dl_iterate_phdr(
                Some(collect),
                (&mut objects as *mut Vec<Vec<Segment>>).cast(),
            );
        }
        objects
            .iter()
            .flat_map(|segments| read_only_ranges(segments, page))
            .map(|(start, end)| {
                // SAFETY: each range is whole pages of a mapped, never-writable segment outside
                // RELRO: its pages are the file's bytes, which a later touch maps back in.
                let rc = unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
                };
                if rc == 0 {
                    end - start
                } else {
                    0
                }
            })
            .sum()
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64")))]
    0
}

/// Whether a debugger (or any tracer) is attached: `TracerPid` in /proc/self/status. Unknown
/// counts as traced.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
fn traced() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .is_none_or(|pid| pid.trim() != "0")
}

/// `dl_iterate_phdr`'s callback: one object's segments, the vDSO skipped.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: glibc passes a valid `dl_phdr_info` for the duration of the call, and `data` is
    // the `Vec` handed to `dl_iterate_phdr` above.
    let (info, objects) = unsafe { (&*info, &mut *data.cast::<Vec<Vec<Segment>>>()) };
    if !info.dlpi_name.is_null() {
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader.
        let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes();
        if name.starts_with(b"linux-vdso") || name.starts_with(b"linux-gate") {
            return 0;
        }
    }
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers of a loaded object.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    let base = info.dlpi_addr as usize;
    if let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
        let at = base.wrapping_add(dynamic.p_vaddr as usize) as *const [u64; 2];
        let n = dynamic.p_memsz as usize / std::mem::size_of::<[u64; 2]>();
        // SAFETY: a loaded object's PT_DYNAMIC segment is mapped and holds `p_memsz` bytes of
        // 16-byte (tag, value) entries, aligned to 8.
        let entries = unsafe { std::slice::from_raw_parts(at, n) };
        if text_relocations(entries.iter().map(|e| (e[0], e[1]))) {
            return 0;
        }
    }
    objects.push(
        phdrs
            .iter()
            .map(|p| Segment {
                kind: p.p_type,
                flags: p.p_flags,
                start: base.wrapping_add(p.p_vaddr as usize),
                len: p.p_memsz as usize,
            })
            .collect(),
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF_R: u32 = 4;
    const PF_X: u32 = 1;

    fn seg(kind: u32, flags: u32, start: usize, len: usize) -> Segment {
        Segment {
            kind,
            flags,
            start,
            len,
        }
    }

    #[test]
    fn only_whole_pages_of_segments_never_writable_outside_relro() {
        let page = 0x1000;
        let segments = [
            seg(6, PF_R, 0x1000_0040, 0x2a0), // PT_PHDR: not a load segment
            seg(PT_LOAD, PF_R, 0x1000_0000, 0x2e_4134),
            seg(PT_LOAD, PF_R | PF_X, 0x102e_5140, 0x84_f4a0),
            seg(PT_LOAD, PF_R | PF_W, 0x10b3_55e0, 0x6_aa20),
            seg(PT_LOAD, PF_R | PF_W, 0x10ba_0db8, 0x3af0),
            seg(PT_GNU_RELRO, PF_R, 0x10b3_55e0, 0x6_aa20),
        ];
        assert_eq!(
            read_only_ranges(&segments, page),
            vec![(0x1000_0000, 0x102e_4000), (0x102e_6000, 0x10b3_4000),]
        );
    }

    #[test]
    fn a_read_only_segment_that_overlaps_relro_is_left_alone() {
        // GNU ld can put RELRO inside a segment; a read-only one touching it is skipped whole.
        let segments = [
            seg(PT_LOAD, PF_R, 0x4000, 0x3000),
            seg(PT_GNU_RELRO, PF_R, 0x6800, 0x100),
            seg(PT_LOAD, PF_R | PF_X, 0x8000, 0x2000),
        ];
        assert_eq!(read_only_ranges(&segments, 0x1000), vec![(0x8000, 0xa000)]);
    }

    #[test]
    fn objects_with_text_relocations_are_told_apart() {
        // DT_NEEDED, DT_FLAGS without DF_TEXTREL, DT_NULL: none.
        assert!(!text_relocations([(1, 5), (DT_FLAGS, 0x8), (DT_NULL, 0)]));
        assert!(text_relocations([(1, 5), (DT_TEXTREL, 0), (DT_NULL, 0)]));
        assert!(text_relocations([
            (DT_FLAGS, DF_TEXTREL | 0x8),
            (DT_NULL, 0)
        ]));
        // Nothing after DT_NULL counts.
        assert!(!text_relocations([(DT_NULL, 0), (DT_TEXTREL, 0)]));
    }

    #[test]
    fn segments_smaller_than_a_page_and_bad_page_sizes_give_nothing() {
        let segments = [seg(PT_LOAD, PF_R, 0x1010, 0x800)];
        assert!(read_only_ranges(&segments, 0x1000).is_empty());
        let whole = [seg(PT_LOAD, PF_R, 0x1000, 0x1000)];
        assert!(read_only_ranges(&whole, 0).is_empty());
        assert!(read_only_ranges(&whole, 3000).is_empty());
        let wraps = [seg(PT_LOAD, PF_R, usize::MAX - 10, 0x1000)];
        assert!(read_only_ranges(&wraps, 0x1000).is_empty());
    }

    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[inline(never)]
    fn checksum(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    #[test]
    fn released_pages_leave_the_process_and_come_back_unchanged_when_used() {
        const TEXT: &[u8] = b"read-only data that must read the same after its page is released";
        let before_sum = checksum(TEXT);
        let before = rss_file_kib();
        let advised = release_read_only_pages();
        let after = rss_file_kib();
        if traced() {
            assert_eq!(advised, 0, "nothing is released under a tracer");
            eprintln!("traced: release skipped, as it must be");
            return;
        }
        // The test binary's own code and read-only data are megabytes.
        assert!(advised > 1 << 20, "advised only {advised} bytes");
        assert!(
            after < before,
            "file-backed RSS did not drop: {before} KiB before, {after} KiB after"
        );
        // Code and constants read back from the page cache unchanged, and relocated
        // pointers (RELRO: vtables, string tables) still work.
        assert_eq!(checksum(TEXT), before_sum);
        let shown = format!(
            "{:?} {}",
            Some(TEXT.len()),
            std::any::type_name::<Segment>()
        );
        assert!(shown.ends_with("Segment"), "{shown}");
    }
}
