//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time, and [`init`] picks the library at run
//! time. Search order (the first library that loads and is new enough wins):
//!
//! 1. the explicit path (`--ort-lib`), a file or a folder;
//! 2. `ORT_DYLIB_PATH`, a file or a folder;
//! 3. the folder of the current executable, and its parent (so `target/debug/deps` test binaries see
//!    `target/debug`);
//! 4. the Python `onnxruntime` / `onnxruntime-gpu` package: in `$VIRTUAL_ENV`, `$CONDA_PREFIX`, `$FLUXRT_VENV`, the
//!    packages that `python3` and `python` would import, and the fluxrt dev venv `~/.cache/fluxrt/venv`
//!    (its `onnxruntime/capi/` folder holds the library and, for the GPU wheel, the providers);
//! 5. system library folders (`LD_LIBRARY_PATH`, `/usr/local/lib`, `/usr/lib`, `/usr/lib/<arch>-linux-gnu`; on
//!    macOS `DYLD_LIBRARY_PATH` and Homebrew; on Windows `PATH`).
//!
//! An explicit path or `ORT_DYLIB_PATH` is authoritative: when it does not hold a usable library, the search stops
//! there with an error instead of silently loading another library. Every failure is ONE error that lists each place
//! tried and what was wrong there, with the fix.

use std::ffi::CStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::logging::LogLevel;

use crate::{Error, Result};

/// The oldest ONNX Runtime this build of `ort` accepts: `(major, minor)`.
pub const MIN_VERSION: (u32, u32) = (1, ort::MINOR_VERSION);

/// The version users are told to install.
pub const RECOMMENDED_VERSION: &str = "1.31.1";

/// How long we wait for `python3 -c ...` to say where `onnxruntime` is.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(5);

/// The loaded ONNX Runtime library and the process-wide `ort` environment.
#[derive(Debug)]
pub struct OrtLibrary {
    path: PathBuf,
    version: String,
    source: String,
    env: Environment,
}

impl OrtLibrary {
    /// The library file that was loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Its version string, e.g. `1.31.1`.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// Where the search found it, e.g. `--ort-lib`, `ORT_DYLIB_PATH`, `python3 onnxruntime package`.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The one `ort` environment of this process.
    pub(crate) fn env(&self) -> &Environment {
        &self.env
    }
}

static LIBRARY: OnceLock<OrtLibrary> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The library loaded by an earlier [`init`], if any. Never loads anything.
pub fn get() -> Option<&'static OrtLibrary> {
    LIBRARY.get()
}

/// Finds, loads and initializes ONNX Runtime (see the module docs for the search order). Idempotent: later calls
/// return the library loaded first. A later call with an explicit path naming a different library is an error,
/// because a process can hold only one ONNX Runtime.
pub fn init(explicit: Option<&Path>) -> Result<&'static OrtLibrary> {
    if let Some(lib) = LIBRARY.get() {
        return check_same(lib, explicit);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lib) = LIBRARY.get() {
        return check_same(lib, explicit);
    }
    let found = locate(explicit, &SearchEnv::from_process())?;
    let env = ort::init_from(&found.path)
        .map_err(|e| load_error(&found.path, &e.to_string()))?
        .with_name("fluxrt")
        .with_telemetry(false)
        .with_logger(std::sync::Arc::new(super::placement::log_sink))
        .build()
        .map_err(|e| {
            Error::runtime(format!(
                "ONNX Runtime {} at {} loaded but its environment could not be created: {e}",
                found.version,
                found.path.display()
            ))
        })?;
    // Sessions log at WARNING unless they ask for more (the placement report, see `placement`).
    env.set_log_level(LogLevel::Warning);
    Ok(LIBRARY.get_or_init(|| OrtLibrary {
        path: found.path,
        version: found.version,
        source: found.source,
        env,
    }))
}

fn check_same(lib: &'static OrtLibrary, explicit: Option<&Path>) -> Result<&'static OrtLibrary> {
    let Some(explicit) = explicit else {
        return Ok(lib);
    };
    // The same library, named by its file or any folder the search accepts, is fine.
    if locate(Some(explicit), &SearchEnv::default()).is_ok_and(|found| found.path == lib.path) {
        return Ok(lib);
    }
    Err(Error::runtime(format!(
        "ONNX Runtime {} is already loaded from {}; a process can use only one ONNX Runtime library, so {} cannot be loaded too",
        lib.version,
        lib.path.display(),
        explicit.display()
    ))
    .with_hint("pass the same --ort-lib everywhere, or start a new process"))
}

fn load_error(path: &Path, msg: &str) -> Error {
    Error::runtime(format!(
        "cannot load ONNX Runtime from {}: {msg}",
        path.display()
    ))
    .with_hint(install_hint())
}

fn install_hint() -> String {
    format!(
        "install it with `pip install onnxruntime=={RECOMMENDED_VERSION}` (or `onnxruntime-gpu=={RECOMMENDED_VERSION}` for CUDA/TensorRT), \
         or pass --ort-lib / set ORT_DYLIB_PATH to the library file or its folder"
    )
}

/// A library that passed the checks and will be handed to `ort::init_from`.
#[derive(Debug)]
pub(crate) struct Found {
    pub path: PathBuf,
    pub version: String,
    pub source: String,
}

/// The inputs of the search, so tests can run it without touching the process environment.
#[derive(Debug, Default, Clone)]
pub(crate) struct SearchEnv {
    pub ort_dylib_path: Option<PathBuf>,
    pub exe_dir: Option<PathBuf>,
    /// Venvs named by the environment (`$VIRTUAL_ENV`, ...), searched before the Python interpreters.
    pub venvs: Vec<(String, PathBuf)>,
    pub pythons: Vec<String>,
    /// Fallback venvs (the fluxrt dev venv), searched after the interpreters.
    pub dev_venvs: Vec<(String, PathBuf)>,
    pub system_dirs: Vec<PathBuf>,
}

impl SearchEnv {
    fn from_process() -> SearchEnv {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let mut venvs = Vec::new();
        for name in ["VIRTUAL_ENV", "CONDA_PREFIX", "FLUXRT_VENV"] {
            if let Some(dir) = var(name) {
                venvs.push((format!("${name}"), dir));
            }
        }
        let mut pythons = vec!["python3".to_string(), "python".to_string()];
        if cfg!(windows) {
            pythons.push("py".to_string());
        }
        let mut dev_venvs = Vec::new();
        if let Some(home) = var("HOME").or_else(|| var("USERPROFILE")) {
            dev_venvs.push((
                "fluxrt dev venv".to_string(),
                home.join(".cache").join("fluxrt").join("venv"),
            ));
        }
        let mut system_dirs: Vec<PathBuf> = Vec::new();
        let path_var = if cfg!(windows) {
            "PATH"
        } else if cfg!(target_os = "macos") {
            "DYLD_LIBRARY_PATH"
        } else {
            "LD_LIBRARY_PATH"
        };
        if let Some(v) = std::env::var_os(path_var) {
            system_dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
        }
        if cfg!(target_os = "macos") {
            system_dirs.extend(["/opt/homebrew/lib", "/usr/local/lib"].map(PathBuf::from));
        } else if cfg!(unix) {
            system_dirs.extend(
                [
                    "/usr/local/lib",
                    "/usr/lib",
                    "/usr/lib64",
                    "/usr/lib/x86_64-linux-gnu",
                    "/usr/lib/aarch64-linux-gnu",
                ]
                .map(PathBuf::from),
            );
        }
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        SearchEnv {
            ort_dylib_path: var("ORT_DYLIB_PATH"),
            exe_dir,
            venvs,
            pythons,
            dev_venvs,
            system_dirs,
        }
    }
}

/// What the search tried, for the one error at the end.
#[derive(Default)]
struct Tried {
    lines: Vec<String>,
    too_old: Option<(PathBuf, String)>,
}

impl Tried {
    fn note(&mut self, what: impl Into<String>) {
        self.lines.push(what.into());
    }

    /// A library too old to use; the first one names the error.
    fn too_old_at(&mut self, source: &str, file: PathBuf, version: String) {
        self.note(format!(
            "{source}: {} (version {version}, too old: fluxrt needs {}.{} or newer)",
            file.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
        if self.too_old.is_none() {
            self.too_old = Some((file, version));
        }
    }

    /// Tries every library file in `dir_or_file`; returns the first usable one.
    fn try_location(&mut self, source: &str, location: &Path) -> Option<Found> {
        let files = if location.is_file() {
            vec![location.to_path_buf()]
        } else if location.is_dir() {
            let files = library_files_in(location);
            if files.is_empty() {
                self.note(format!(
                    "{source}: {} (no ONNX Runtime library in this folder)",
                    location.display()
                ));
            }
            files
        } else {
            self.note(format!("{source}: {} (does not exist)", location.display()));
            return None;
        };
        for file in files {
            match probe_file(&file) {
                Ok(version) => {
                    let path = std::fs::canonicalize(&file).unwrap_or(file);
                    return Some(Found {
                        path,
                        version,
                        source: source.to_string(),
                    });
                }
                Err(Problem::TooOld(version)) => self.too_old_at(source, file, version),
                Err(Problem::Other(why)) => {
                    self.note(format!("{source}: {} ({why})", file.display()))
                }
            }
        }
        None
    }

    fn into_error(self) -> Error {
        let mut msg = match &self.too_old {
            Some((path, version)) => format!(
                "ONNX Runtime {version} found at {} is too old: fluxrt needs ONNX Runtime {}.{} or newer. Tried:",
                path.display(),
                MIN_VERSION.0,
                MIN_VERSION.1
            ),
            None => "no usable ONNX Runtime library found. Tried:".to_string(),
        };
        for line in &self.lines {
            msg.push_str("\n    ");
            msg.push_str(line);
        }
        Error::runtime(msg).with_hint(install_hint())
    }
}

/// Runs the search. Pure apart from reading the file system, loading candidate libraries to read their version and
/// asking the Python interpreters in `env.pythons`.
pub(crate) fn locate(explicit: Option<&Path>, env: &SearchEnv) -> Result<Found> {
    let mut tried = Tried::default();

    // Authoritative sources: a failure stops the search.
    let authoritative = match explicit {
        Some(p) => Some(("--ort-lib", p.to_path_buf())),
        None => env.ort_dylib_path.clone().map(|p| ("ORT_DYLIB_PATH", p)),
    };
    if let Some((source, path)) = authoritative {
        for location in expand_user_location(&path) {
            if let Some(found) = tried.try_location(source, &location) {
                return Ok(found);
            }
        }
        return Err(tried.into_error());
    }
    tried.note("ORT_DYLIB_PATH: not set");

    if let Some(dir) = &env.exe_dir {
        let mut dirs = vec![dir.clone()];
        dirs.extend(dir.parent().map(Path::to_path_buf));
        for d in dirs {
            if let Some(found) = tried.try_location("beside the executable", &d) {
                return Ok(found);
            }
        }
    }

    // Python packages: venvs named by the environment, then the interpreters on PATH, then the dev venv.
    for (name, venv) in &env.venvs {
        if let Some(found) = try_venv(&mut tried, name, venv) {
            return Ok(found);
        }
    }
    for python in &env.pythons {
        match python_package_dir(python) {
            Ok(pkg) => {
                if let Some(found) =
                    tried.try_location(&format!("{python} onnxruntime package"), &pkg.join("capi"))
                {
                    return Ok(found);
                }
            }
            Err(why) => tried.note(format!("{python}: {why}")),
        }
    }
    for (name, venv) in &env.dev_venvs {
        if let Some(found) = try_venv(&mut tried, name, venv) {
            return Ok(found);
        }
    }

    let mut empty = Vec::new();
    for dir in &env.system_dirs {
        if !dir.is_dir() || library_files_in(dir).is_empty() {
            empty.push(dir.display().to_string());
            continue;
        }
        if let Some(found) = tried.try_location("system library folder", dir) {
            return Ok(found);
        }
    }
    if !empty.is_empty() {
        tried.note(format!(
            "system library folders: none in {}",
            empty.join(", ")
        ));
    }
    Err(tried.into_error())
}

/// A user-given folder may be the library's folder, a Python package (`.../onnxruntime`) or a venv.
fn expand_user_location(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() || !library_files_in(path).is_empty() {
        return vec![path.to_path_buf()];
    }
    for sub in ["capi", "onnxruntime/capi", "lib"] {
        let p = path.join(sub);
        if p.is_dir() && !library_files_in(&p).is_empty() {
            return vec![p];
        }
    }
    let in_venv: Vec<PathBuf> = venv_packages(path)
        .into_iter()
        .map(|pkg| pkg.join("capi"))
        .collect();
    if in_venv.is_empty() {
        vec![path.to_path_buf()]
    } else {
        in_venv
    }
}

fn try_venv(tried: &mut Tried, name: &str, venv: &Path) -> Option<Found> {
    if !venv.is_dir() {
        tried.note(format!("{name}: {} (does not exist)", venv.display()));
        return None;
    }
    let pkgs = venv_packages(venv);
    if pkgs.is_empty() {
        tried.note(format!(
            "{name}: {} (no onnxruntime package installed)",
            venv.display()
        ));
        return None;
    }
    pkgs.into_iter()
        .find_map(|pkg| tried.try_location(name, &pkg.join("capi")))
}

/// `<venv>/lib/python3.*/site-packages/onnxruntime` (Unix) or `<venv>/Lib/site-packages/onnxruntime` (Windows).
fn venv_packages(venv: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in ["lib", "lib64"] {
        let Ok(entries) = std::fs::read_dir(venv.join(lib)) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
            .map(|e| e.path().join("site-packages").join("onnxruntime"))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        out.extend(dirs);
    }
    let win = venv.join("Lib").join("site-packages").join("onnxruntime");
    if win.is_dir() {
        out.push(win);
    }
    out.dedup();
    out
}

/// Asks `python` where the `onnxruntime` package is, without importing it (fast, no numpy import).
fn python_package_dir(python: &str) -> std::result::Result<PathBuf, String> {
    const SCRIPT: &str = "import importlib.util as u\ns = u.find_spec('onnxruntime')\nprint(s.origin if s and s.origin else '')";
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "not on PATH".to_string()
            } else {
                e.to_string()
            }
        })?;
    let deadline = Instant::now() + PYTHON_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not answer within {} s",
                    PYTHON_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("failed ({status})"));
    }
    let origin = out.trim();
    if origin.is_empty() {
        return Err("onnxruntime is not installed for it".to_string());
    }
    Path::new(origin)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("odd package path {origin}"))
}

/// Library files in `dir`, newest version first.
fn library_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = library_name_version(&name)?;
            let path = e.path();
            path.is_file().then_some((version, path))
        })
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    files.into_iter().map(|(_, p)| p).collect()
}

/// `Some(version numbers in the name)` when `name` is an ONNX Runtime main library for this OS (not a provider).
fn library_name_version(name: &str) -> Option<Vec<u32>> {
    let nums = |s: &str| {
        s.split('.')
            .map_while(|p| p.parse::<u32>().ok())
            .collect::<Vec<_>>()
    };
    if cfg!(windows) {
        return name.eq_ignore_ascii_case("onnxruntime.dll").then(Vec::new);
    }
    if cfg!(target_os = "macos") {
        if name == "libonnxruntime.dylib" {
            return Some(Vec::new());
        }
        let mid = name
            .strip_prefix("libonnxruntime.")?
            .strip_suffix(".dylib")?;
        return Some(nums(mid));
    }
    if name == "libonnxruntime.so" {
        return Some(Vec::new());
    }
    name.strip_prefix("libonnxruntime.so.").map(nums)
}

enum Problem {
    TooOld(String),
    Other(String),
}

/// Loads `file` to read its version (`OrtGetApiBase()->GetVersionString()`), without touching `ort`'s global state.
fn probe_file(file: &Path) -> std::result::Result<String, Problem> {
    let version = read_version(file).map_err(Problem::Other)?;
    if version_ok(&version) {
        Ok(version)
    } else {
        Err(Problem::TooOld(version))
    }
}

/// The version string of the ONNX Runtime library at `file`.
pub fn read_version(file: &Path) -> std::result::Result<String, String> {
    // SAFETY: loading a library runs its initializers; ONNX Runtime's are self-contained. The library is unloaded
    // again when `lib` drops (ort keeps its own handle to the one it uses).
    let lib = unsafe { libloading::Library::new(file) }
        .map_err(|e| format!("not a loadable library: {e}"))?;
    // SAFETY: the signature is that of OrtGetApiBase in every ONNX Runtime release.
    let get_base: libloading::Symbol<'_, unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
        unsafe { lib.get(b"OrtGetApiBase\0") }
            .map_err(|_| "not ONNX Runtime (no OrtGetApiBase symbol)".to_string())?;
    // SAFETY: OrtGetApiBase returns a pointer to a static struct; GetVersionString a static C string.
    let version = unsafe {
        let base = get_base();
        if base.is_null() {
            return Err("OrtGetApiBase returned null".to_string());
        }
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            return Err("no version string".to_string());
        }
        CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    Ok(version)
}

/// Whether a version string like `1.31.1` is at least [`MIN_VERSION`].
pub fn version_ok(version: &str) -> bool {
    let mut parts = version
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_VERSION
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The library for tests, through the real discovery. Panics (fails the test) with the discovery error when no
    /// library can be found: tests that need ONNX Runtime must never pass silently without it.
    pub(crate) fn test_library() -> &'static OrtLibrary {
        match init(None) {
            Ok(lib) => lib,
            Err(e) => panic!("ONNX Runtime is required for this test and discovery failed:\n{e}"),
        }
    }

    fn empty_env() -> SearchEnv {
        SearchEnv::default()
    }

    #[test]
    fn discovery_finds_a_library() {
        let lib = test_library();
        assert!(lib.path().is_file(), "{}", lib.path().display());
        assert!(version_ok(lib.version()), "{}", lib.version());
        // Idempotent, and an explicit path naming the same library (or its folder) is accepted.
        let again = init(Some(lib.path())).expect("same library again");
        assert!(std::ptr::eq(lib, again));
        init(Some(lib.path().parent().unwrap())).expect("its folder");
        // A different explicit path is refused: one library per process.
        let err = init(Some(Path::new("/nonexistent/libonnxruntime.so.1.31.1"))).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Runtime);
        assert!(err.message.contains("already loaded"), "{err}");
    }

    #[test]
    fn discovery_finds_the_venv_package() {
        // The dev venv (or $FLUXRT_VENV / $VIRTUAL_ENV) as the only source.
        let from_process = SearchEnv::from_process();
        let venvs: Vec<_> = (from_process.venvs.iter().chain(&from_process.dev_venvs))
            .filter(|(_, v)| !venv_packages(v).is_empty())
            .cloned()
            .collect();
        if venvs.is_empty() {
            // No venv here: the library must have come from somewhere else, which the test above covers.
            test_library();
            return;
        }
        let env = SearchEnv {
            venvs,
            ..empty_env()
        };
        let found = locate(None, &env).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            found.path.to_string_lossy().contains("onnxruntime"),
            "{}",
            found.path.display()
        );
        assert!(version_ok(&found.version));
    }

    #[test]
    fn explicit_bad_path_lists_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").join("libonnxruntime.so.1.31.1");
        let err = locate(Some(&missing), &empty_env()).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Runtime);
        assert!(err.message.contains("--ort-lib"), "{err}");
        assert!(
            err.message.contains(&missing.display().to_string()),
            "{err}"
        );
        assert!(err.message.contains("does not exist"), "{err}");
        let hint = err.hint.as_deref().unwrap();
        assert!(
            hint.contains("pip install onnxruntime==1.31.1") && hint.contains("onnxruntime-gpu"),
            "{hint}"
        );

        // An empty folder.
        let err = locate(Some(dir.path()), &empty_env()).unwrap_err();
        assert!(
            err.message
                .contains("no ONNX Runtime library in this folder"),
            "{err}"
        );
    }

    #[test]
    fn explicit_folder_may_be_a_package_or_venv() {
        let lib = test_library();
        let capi = lib.path().parent().unwrap();
        let found = locate(Some(capi), &empty_env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.path, lib.path());
        if capi.file_name().is_some_and(|n| n == "capi") {
            let pkg = capi.parent().unwrap();
            assert_eq!(locate(Some(pkg), &empty_env()).unwrap().path, lib.path());
            // <venv>/lib/pythonX.Y/site-packages/onnxruntime/capi
            if let Some(venv) = pkg
                .ancestors()
                .nth(4)
                .filter(|v| !venv_packages(v).is_empty())
            {
                assert_eq!(locate(Some(venv), &empty_env()).unwrap().path, lib.path());
                eprintln!("venv folder {} ok", venv.display());
            }
        }
    }

    #[test]
    fn fake_library_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&fake, b"this is not a shared library").unwrap();
        let env = SearchEnv {
            ort_dylib_path: Some(dir.path().to_path_buf()),
            ..empty_env()
        };
        let err = locate(None, &env).unwrap_err();
        assert!(err.message.contains("ORT_DYLIB_PATH"), "{err}");
        assert!(err.message.contains("not a loadable library"), "{err}");
        assert!(err.message.contains(&fake.display().to_string()), "{err}");
    }

    #[test]
    fn non_ort_library_is_reported() {
        // A real shared library that is not ONNX Runtime.
        let Some(libc) = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file()) else {
            return;
        };
        let err = locate(Some(libc), &empty_env()).unwrap_err();
        assert!(err.message.contains("no OrtGetApiBase"), "{err}");
    }

    #[test]
    fn full_search_without_anything_lists_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let env = SearchEnv {
            ort_dylib_path: None,
            exe_dir: Some(dir.path().join("deps")),
            venvs: vec![("$FLUXRT_VENV".into(), dir.path().join("venv"))],
            pythons: vec!["fluxrt-no-such-python".into()],
            dev_venvs: vec![],
            system_dirs: vec![dir.path().join("sys")],
        };
        let err = locate(None, &env).unwrap_err();
        for needle in [
            "ORT_DYLIB_PATH: not set",
            "beside the executable",
            "$FLUXRT_VENV",
            "fluxrt-no-such-python: not on PATH",
            "system library folders",
        ] {
            assert!(
                err.message.contains(needle),
                "missing {needle:?} in:\n{err}"
            );
        }
    }

    #[test]
    fn version_check() {
        assert!(version_ok("1.31.1"));
        assert!(version_ok("1.32.0"));
        assert!(version_ok("2.0.0"));
        assert!(!version_ok("1.20.1"));
        assert!(!version_ok("1.30.0"));
        assert!(!version_ok("garbage"));
    }

    #[test]
    fn library_names() {
        if cfg!(target_os = "linux") {
            assert_eq!(
                library_name_version("libonnxruntime.so.1.31.1"),
                Some(vec![1, 31, 1])
            );
            assert_eq!(library_name_version("libonnxruntime.so"), Some(vec![]));
            assert_eq!(
                library_name_version("libonnxruntime_providers_shared.so"),
                None
            );
            assert_eq!(
                library_name_version("libonnxruntime_providers_cuda.so"),
                None
            );
        }
    }

    #[test]
    fn too_old_library_is_named() {
        let mut tried = Tried::default();
        tried.too_old_at(
            "ORT_DYLIB_PATH",
            "/x/libonnxruntime.so.1.20.1".into(),
            "1.20.1".into(),
        );
        tried.note("somewhere else (does not exist)");
        let err = tried.into_error();
        assert!(
            err.message.starts_with(
                "ONNX Runtime 1.20.1 found at /x/libonnxruntime.so.1.20.1 is too old: fluxrt needs ONNX Runtime 1."
            ),
            "{err}"
        );
        assert!(err.message.contains("version 1.20.1, too old"), "{err}");
        assert!(err.message.contains("somewhere else"), "{err}");
    }

    /// The same against a real old library: FLUXRT_TEST_OLD_ORT names one (e.g.
    /// `onnxruntime/capi/libonnxruntime.so.1.20.1` from the 1.20.1 wheel).
    #[test]
    #[ignore = "needs FLUXRT_TEST_OLD_ORT: an old libonnxruntime; run with --ignored"]
    fn a_real_too_old_library_is_named() {
        let old = std::env::var_os("FLUXRT_TEST_OLD_ORT")
            .expect("set FLUXRT_TEST_OLD_ORT to an ONNX Runtime library older than 1.31");
        let err = locate(Some(Path::new(&old)), &empty_env()).unwrap_err();
        assert!(err.message.contains("too old"), "{err}");
        assert!(err.message.contains("1.31 or newer"), "{err}");
        eprintln!("{err}");
    }
}
