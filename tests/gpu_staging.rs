//! scripts/gpu/stage.py and unstage.py, which carry ONNX Runtime's GPU libraries to a GPU
//! machine without network in compressed, checksummed parts, run on a small synthetic wheel:
//! the libraries must come back byte for byte, and a damaged part or a wheel whose RECORD does
//! not match its files must be refused by name. No network: the wheel is built here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::s;

/// The wheel's dist-info folder, as `pip download` would name it for version 1.0.0.
const DIST_INFO: &str = "onnxruntime_gpu-1.0.0.dist-info";
const CAPI: &str = "onnxruntime/capi";

/// Builds a wheel (a zip) of every file under `tree`, with METADATA and a RECORD that gives each
/// file's real sha256, except `falsify`'s (if any), whose RECORD hash is that of other bytes.
/// Python's zipfile writes it: no zip writer is among this crate's dependencies.
const MAKE_WHEEL: &str = r#"
import base64, hashlib, pathlib, sys, zipfile
tree, wheel, falsify, dist = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
record = []
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        name, data = path.relative_to(tree).as_posix(), path.read_bytes()
        z.writestr(name, data)
        digest = hashlib.sha256(data + (b"!" if name == falsify else b"")).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(data)}")
    z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.0.0\n")
    record += [f"{dist}/METADATA,,", f"{dist}/RECORD,,"]
    z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
"#;

/// Prints, as JSON, the sha256 (hex) that the wheel's RECORD gives for each of its files and
/// that of each file in a folder: computed apart from the scripts under test.
const HASHES: &str = r#"
import base64, csv, hashlib, json, pathlib, sys, zipfile
wheel, dist, libdir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with zipfile.ZipFile(wheel) as z:
    rows = csv.reader(z.read(f"{dist}/RECORD").decode().splitlines())
    record = {r[0].rsplit("/", 1)[-1]: base64.urlsafe_b64decode(r[1][7:] + "==").hex()
              for r in rows if r[1].startswith("sha256=")}
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in libdir.iterdir()}
print(json.dumps({"record": record, "files": files}))
"#;

/// The Python the scripts run with: FASTCACHE_TEST_PYTHON when set (checked by the shared
/// helper), else the system `python3`: the scripts need nothing but the standard library.
fn python() -> PathBuf {
    if std::env::var_os("FASTCACHE_TEST_PYTHON").is_some_and(|p| !p.is_empty()) {
        common::python()
    } else {
        PathBuf::from("python3")
    }
}

fn script(name: &str) -> PathBuf {
    common::root().join("scripts/gpu").join(name)
}

fn run(command: &mut Command) -> Output {
    command.output().expect("start python")
}

fn succeeded(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The stderr of a script that must fail cleanly: non-zero exit, an error line, no traceback.
fn failed(output: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "{what} should have failed:\n{stderr}"
    );
    assert!(
        stderr.contains("error: "),
        "{what}: no error line:\n{stderr}"
    );
    assert!(
        !stderr.contains("Traceback"),
        "{what}: a traceback, not a message:\n{stderr}"
    );
    stderr
}

/// Deterministic, incompressible bytes (xorshift64*), so that xz cannot shrink the libraries
/// and `--part-mib 1` makes several parts out of a few MiB.
fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The files of the synthetic wheel: name under onnxruntime/capi -> contents.
fn libraries() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("libonnxruntime.so.1.0.0", pseudo_random(2 << 20, 1)),
        (
            "libonnxruntime_providers_cuda.so",
            pseudo_random(3 << 20, 2),
        ),
        // Small and compressible, like the real one: it shares a part with the CUDA provider.
        (
            "libonnxruntime_providers_shared.so",
            b"shared provider bridge\n".repeat(500),
        ),
    ]
}

/// Writes the package tree and zips it into `dir/name`, falsifying `falsify`'s RECORD hash.
fn make_wheel(dir: &Path, name: &str, falsify: &str) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    let capi = tree.join(CAPI);
    std::fs::create_dir_all(&capi).unwrap();
    for (file, bytes) in libraries() {
        std::fs::write(capi.join(file), bytes).unwrap();
    }
    // Not libraries to stage: the Python extension module and the package's Python code.
    std::fs::write(
        capi.join("onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so"),
        b"ext",
    )
    .unwrap();
    std::fs::write(tree.join("onnxruntime/__init__.py"), b"").unwrap();
    let wheel = dir.join(name);
    succeeded(
        run(Command::new(python()).args([
            "-c",
            MAKE_WHEEL,
            s(&tree),
            s(&wheel),
            falsify,
            DIST_INFO,
        ])),
        "building the synthetic wheel",
    );
    wheel
}

fn stage(wheel: &Path, out: &Path) -> Output {
    run(Command::new(python()).arg(script("stage.py")).args([
        "--wheel",
        s(wheel),
        "--out",
        s(out),
        "--part-mib",
        "1",
    ]))
}

fn unstage(dirs: &[&Path], libdir: &Path) -> Output {
    run(Command::new(python())
        .arg(script("unstage.py"))
        .args(dirs.iter().map(|d| s(d)))
        .args(["-o", s(libdir)]))
}

/// The part folders under `dir`, in order.
fn part_folders(dir: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    parts.sort();
    parts
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn libraries_survive_parts_spread_over_transfers_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = make_wheel(
        dir.path(),
        "onnxruntime_gpu-1.0.0-cp312-cp312-linux_x86_64.whl",
        "",
    );
    let parts = dir.path().join("parts");
    let printed = succeeded(stage(&wheel, &parts), "stage.py");

    // Each part in its own folder with its own copy of the manifest, none over 1 MiB.
    let folders = part_folders(&parts);
    assert!(
        folders.len() >= 5,
        "5 MiB of random bytes in 1 MiB parts: {folders:?}\n{printed}"
    );
    for (i, folder) in folders.iter().enumerate() {
        let name = format!("part-{i:03}");
        assert_eq!(folder.file_name().unwrap().to_str().unwrap(), name);
        assert!(
            folder.join("manifest.json").is_file(),
            "{name} has no manifest"
        );
        let size = std::fs::metadata(folder.join(&name)).unwrap().len();
        assert!(size > 0 && size <= 1 << 20, "{name}: {size} bytes");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folders[0].join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["wheel"]["version"], "1.0.0");
    let staged: Vec<&str> = manifest["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        staged,
        libraries().iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "only lib*.so* of capi/"
    );

    // As the transfers land: the first part alone in one place, the others under a parent.
    let first = dir.path().join("transfer-1");
    let rest = dir.path().join("transfer-2");
    copy_dir(&folders[0], &first.join("part-000"));
    for folder in &folders[1..] {
        copy_dir(folder, &rest.join(folder.file_name().unwrap()));
    }
    let libdir = dir.path().join("lib");
    let printed = succeeded(
        unstage(&[&first.join("part-000"), &rest], &libdir),
        "unstage.py",
    );
    assert_eq!(
        printed
            .lines()
            .filter(|l| l.contains("matches the wheel's RECORD"))
            .count(),
        3,
        "{printed}"
    );
    for (name, bytes) in libraries() {
        assert!(
            std::fs::read(libdir.join(name)).unwrap() == bytes,
            "{name} differs from the wheel's"
        );
    }
    assert!(
        std::fs::read(libdir.join("libonnxruntime.so")).unwrap() == libraries()[0].1,
        "libonnxruntime.so does not lead to libonnxruntime.so.1.0.0"
    );
    let hashes: serde_json::Value = common::python_json(Command::new(python()).args([
        "-c",
        HASHES,
        s(&wheel),
        DIST_INFO,
        s(&libdir),
    ]));
    for (name, _) in libraries() {
        assert_eq!(
            hashes["files"][name], hashes["record"][name],
            "{name}: sha256 is not RECORD's"
        );
        assert!(hashes["files"][name].is_string(), "{name} was not hashed");
    }
    // Nothing but the libraries and the alias: no temporary files left behind.
    assert_eq!(std::fs::read_dir(&libdir).unwrap().count(), 4);

    // One flipped byte in the third part: refused by the part's name, before any library is
    // written.
    let damaged = dir.path().join("damaged");
    for folder in &folders {
        copy_dir(folder, &damaged.join(folder.file_name().unwrap()));
    }
    let victim = damaged.join("part-002/part-002");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[1234] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let out = dir.path().join("lib-damaged");
    let stderr = failed(unstage(&[&damaged], &out), "unstage.py of a damaged part");
    assert!(
        stderr.contains("part-002") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(
        !out.exists() || std::fs::read_dir(&out).unwrap().count() == 0,
        "wrote despite a bad part"
    );

    // A transfer that never arrived: named too.
    std::fs::remove_dir_all(rest.join("part-003")).unwrap();
    let stderr = failed(
        unstage(&[&first, &rest], &dir.path().join("lib-missing")),
        "unstage.py without a part",
    );
    assert!(
        stderr.contains("part-003") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn a_wheel_whose_record_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let victim = format!("{CAPI}/libonnxruntime_providers_cuda.so");
    let wheel = make_wheel(
        dir.path(),
        "onnxruntime_gpu-1.0.0-cp312-cp312-linux_x86_64.whl",
        &victim,
    );
    let parts = dir.path().join("parts");
    let stderr = failed(
        stage(&wheel, &parts),
        "stage.py of a wheel with a wrong RECORD hash",
    );
    assert!(
        stderr.contains(&victim) && stderr.contains("RECORD"),
        "{stderr}"
    );
    assert!(
        !parts.exists(),
        "parts were written for a wheel that fails its RECORD"
    );
}

/// scripts/gpu/check.sh, the GPU machine's one check, run here on the CPU provider (`EP=cpu`,
/// nothing to reassemble): every model's row is filled, the never-skip rewrite and the host
/// splits reproduce their single graphs (float16 to its rounding), and each speed is a number.
#[test]
fn the_gpu_check_script_runs_on_the_cpu_provider() {
    common::require_ort();
    let output = Command::new("bash")
        .arg(common::root().join("scripts/gpu/check.sh"))
        .env("EP", "cpu")
        .env("STEPS", "3")
        .env("PYTHON", common::python())
        .env("BIN", env!("CARGO_BIN_EXE_fastcache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "check.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| model"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 5, "{stdout}");
    for row in rows {
        let number = |i: usize| -> f64 {
            row[i]
                .parse()
                .unwrap_or_else(|_| panic!("column {i} of {row:?}"))
        };
        let bound = if row[0].ends_with("_f16") { 2e-3 } else { 1e-5 };
        for column in 1..=3 {
            assert!(number(column) <= bound, "{row:?}");
        }
        assert_eq!(number(4), 0.0, "cpu against cpu: {row:?}");
        for column in 5..=8 {
            assert!(number(column) > 0.0, "{row:?}");
        }
        // CUDA graphs exist on the GPU providers only.
        assert_eq!(row[9..], ["n/a (CPU)", "n/a"], "{row:?}");
    }
}
