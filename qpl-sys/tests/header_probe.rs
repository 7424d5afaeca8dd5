//! Checks every offset and constant the Rust side uses against the real `qpl.h`, by compiling
//! a small C probe with the flags pkg-config gives for `qpl`. Skips, saying so, where QPL's
//! headers are not installed (set PKG_CONFIG_PATH to QPL's lib/pkgconfig to run it).

use std::process::Command;

use qpl_sys::{flag, level, offset, op, path, status};

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <qpl/qpl.h>
#define P(name, value) printf("%s %lld\n", name, (long long)(value))
int main(void) {
    P("offset.next_in_ptr", offsetof(qpl_job, next_in_ptr));
    P("offset.available_in", offsetof(qpl_job, available_in));
    P("offset.total_in", offsetof(qpl_job, total_in));
    P("offset.next_out_ptr", offsetof(qpl_job, next_out_ptr));
    P("offset.available_out", offsetof(qpl_job, available_out));
    P("offset.total_out", offsetof(qpl_job, total_out));
    P("offset.op", offsetof(qpl_job, op));
    P("offset.flags", offsetof(qpl_job, flags));
    P("offset.level", offsetof(qpl_job, level));
    P("sizeof.qpl_job", sizeof(qpl_job));
    P("sizeof.qpl_status", sizeof(qpl_status));
    P("sizeof.qpl_path_t", sizeof(qpl_path_t));
    P("sizeof.available_in", sizeof(((qpl_job *)0)->available_in));
    P("sizeof.total_out", sizeof(((qpl_job *)0)->total_out));
    P("sizeof.op", sizeof(((qpl_job *)0)->op));
    P("sizeof.flags", sizeof(((qpl_job *)0)->flags));
    P("sizeof.level", sizeof(((qpl_job *)0)->level));
    P("path.auto", qpl_path_auto);
    P("path.hardware", qpl_path_hardware);
    P("path.software", qpl_path_software);
    P("op.decompress", qpl_op_decompress);
    P("op.compress", qpl_op_compress);
    P("flag.first", QPL_FLAG_FIRST);
    P("flag.last", QPL_FLAG_LAST);
    P("flag.dynamic_huffman", QPL_FLAG_DYNAMIC_HUFFMAN);
    P("flag.omit_verify", QPL_FLAG_OMIT_VERIFY);
    P("level.default", qpl_default_level);
    P("level.high", qpl_high_level);
    P("status.ok", QPL_STS_OK);
    P("status.being_processed", QPL_STS_BEING_PROCESSED);
    P("status.more_output_needed", QPL_STS_MORE_OUTPUT_NEEDED);
    P("status.queues_are_busy", QPL_STS_QUEUES_ARE_BUSY_ERR);
    P("status.unsupported_compression_level", QPL_STS_UNSUPPORTED_COMPRESSION_LEVEL);
    P("status.init_hw_not_supported", QPL_STS_INIT_HW_NOT_SUPPORTED);
    P("status.init_libaccel_not_found", QPL_STS_INIT_LIBACCEL_NOT_FOUND);
    P("status.init_libaccel_error", QPL_STS_INIT_LIBACCEL_ERROR);
    P("status.init_work_queues_not_available", QPL_STS_INIT_WORK_QUEUES_NOT_AVAILABLE);
    return 0;
}
"#;

#[test]
fn rust_constants_match_qpl_header() {
    let cflags = match Command::new("pkg-config")
        .args(["--cflags", "qpl"])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            eprintln!(
                "SKIP rust_constants_match_qpl_header: pkg-config finds no `qpl` (QPL's headers \
                 are not installed; set PKG_CONFIG_PATH to QPL's lib/pkgconfig to run this check)"
            );
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("qpl-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let src = dir.join("probe.c");
    let bin = dir.join("probe");
    std::fs::write(&src, PROBE).expect("write probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(cflags.split_whitespace())
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "probe did not compile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin).output().expect("run probe");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let _ = std::fs::remove_dir_all(&dir);
    let get = |name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("probe printed no {name}"))
            .trim()
            .parse()
            .expect("number")
    };
    let expect: &[(&str, i64)] = &[
        ("offset.next_in_ptr", offset::NEXT_IN_PTR as i64),
        ("offset.available_in", offset::AVAILABLE_IN as i64),
        ("offset.total_in", offset::TOTAL_IN as i64),
        ("offset.next_out_ptr", offset::NEXT_OUT_PTR as i64),
        ("offset.available_out", offset::AVAILABLE_OUT as i64),
        ("offset.total_out", offset::TOTAL_OUT as i64),
        ("offset.op", offset::OP as i64),
        ("offset.flags", offset::FLAGS as i64),
        ("offset.level", offset::LEVEL as i64),
        ("sizeof.qpl_job", offset::PUBLIC_SIZE as i64),
        ("sizeof.qpl_status", 4),
        ("sizeof.qpl_path_t", 4),
        ("sizeof.available_in", 4),
        ("sizeof.total_out", 4),
        ("sizeof.op", 4),
        ("sizeof.flags", 4),
        ("sizeof.level", 4),
        ("path.auto", path::AUTO as i64),
        ("path.hardware", path::HARDWARE as i64),
        ("path.software", path::SOFTWARE as i64),
        ("op.decompress", op::DECOMPRESS as i64),
        ("op.compress", op::COMPRESS as i64),
        ("flag.first", flag::FIRST as i64),
        ("flag.last", flag::LAST as i64),
        ("flag.dynamic_huffman", flag::DYNAMIC_HUFFMAN as i64),
        ("flag.omit_verify", flag::OMIT_VERIFY as i64),
        ("level.default", level::DEFAULT as i64),
        ("level.high", level::HIGH as i64),
        ("status.ok", status::OK as i64),
        ("status.being_processed", status::BEING_PROCESSED as i64),
        (
            "status.more_output_needed",
            status::MORE_OUTPUT_NEEDED as i64,
        ),
        ("status.queues_are_busy", status::QUEUES_ARE_BUSY_ERR as i64),
        (
            "status.unsupported_compression_level",
            status::UNSUPPORTED_COMPRESSION_LEVEL as i64,
        ),
        (
            "status.init_hw_not_supported",
            status::INIT_HW_NOT_SUPPORTED as i64,
        ),
        (
            "status.init_libaccel_not_found",
            status::INIT_LIBACCEL_NOT_FOUND as i64,
        ),
        (
            "status.init_libaccel_error",
            status::INIT_LIBACCEL_ERROR as i64,
        ),
        (
            "status.init_work_queues_not_available",
            status::INIT_WORK_QUEUES_NOT_AVAILABLE as i64,
        ),
    ];
    for (name, want) in expect {
        assert_eq!(
            get(name),
            *want,
            "{name}: header says {}, Rust says {want}",
            get(name)
        );
    }
    eprintln!("qpl.h probe: {} offsets and constants match", expect.len());
}
