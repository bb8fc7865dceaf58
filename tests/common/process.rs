//! Child processes for the tests: running a command to its end, spawning
//! one that dies with the test thread, terminating and reaping it, its log
//! file, and polling until something holds.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub(crate) static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn next_n() -> usize {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A command line for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin from /dev/null.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", cmdline(cmd)))
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        cmdline(cmd),
        out.status,
        stdout_of(&out),
        stderr_of(&out)
    );
    stdout_of(&out)
}

/// Runs `cmd` with `input` on stdin; panics unless it succeeds; returns stdout.
pub fn run_with_input(cmd: &mut Command, input: &str) -> String {
    let line = cmdline(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write to `{line}`: {e}"));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{line}` failed ({}): {}",
        out.status,
        stderr_of(&out)
    );
    stdout_of(&out)
}

/// stdout as text.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Makes the child get `sig` when the spawning thread dies, so a killed test
/// run leaves no daemons behind.
pub(crate) fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().expect("cannot reap child")
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    wait_for_every(Duration::from_millis(20), timeout, f)
}

/// Polls `f` every `interval` until it returns `Some` or `timeout` passes.
pub fn wait_for_every<T>(
    interval: Duration,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// An anonymous log file for a child's stdout and stderr.
pub(crate) struct LogFile(File);

impl LogFile {
    pub(crate) fn new() -> Self {
        Self(tempfile::tempfile().expect("cannot create a log file"))
    }
    pub(crate) fn stdio(&self) -> (Stdio, Stdio) {
        (
            Stdio::from(self.0.try_clone().unwrap()),
            Stdio::from(self.0.try_clone().unwrap()),
        )
    }
    /// Everything written so far. Reads with `pread`: the child's fds share
    /// the file offset, so seeking here would make it overwrite its log.
    pub(crate) fn text(&self) -> String {
        use std::os::unix::fs::FileExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match self.0.read_at(&mut chunk, buf.len() as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
