//! `dev`'s walk-through, executed as printed: the test starts `clerk-grpc-auth dev` (plaintext,
//! then `--tls`), takes the commands it prints, runs them in order in one bash, and checks
//! each against the result printed under it (`→ …`) and its exit code. Then it stops `dev`
//! with Ctrl-C (SIGINT), which must be a clean, prompt stop with the examples still attached.
//!
//! Two programs are stood in for, on the script's `PATH`: `grpcurl` is this test binary (see
//! `grpcurl.rs`), and `cargo` runs what `cargo test` has already built (the binary and the
//! examples) instead of building again. Everything else (`export`, `$(…)`, `curl`, `&`,
//! `$!`, `kill`) is the real shell and the real tools. Every wait has one overall deadline,
//! so a walk-through that hangs fails instead.
//!
//! A custom harness (`harness = false`): the same binary is the grpcurl stand-in when started
//! with `WALKTHROUGH_AS_GRPCURL` set.

mod grpcurl;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// The line `dev` ends its walk-through with (`src/cmd/walkthrough.rs`).
const END_LINE: &str = "# dev is running. Ctrl-C in its terminal stops it.";

fn main() -> ExitCode {
    if std::env::var_os("WALKTHROUGH_AS_GRPCURL").is_some() {
        let code = grpcurl::main(std::env::args().skip(1).collect());
        std::process::exit(code);
    }
    // `cargo test -- FILTER` passes a filter; `--list` asks for the tests' names.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests: [(&str, bool); 2] = [("walkthrough_plaintext", false), ("walkthrough_tls", true)];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let mut failed = 0;
    let mut ran = 0;
    for (name, tls) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        match std::panic::catch_unwind(|| walkthrough(tls)) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        ran - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Characters a comment line of the walk-through never holds: pasted into zsh without
/// `interactivecomments`, a comment line is a command named `#`, and these would quote,
/// substitute, redirect, glob or run something (`"` must come in pairs).
const NOT_IN_COMMENTS: &[char] = &[
    '\'', '`', '(', ')', '<', '>', '|', '&', ';', '$', '\\', '*', '?', '[', ']',
];

/// One command of the walk-through and what it should print.
#[derive(Debug)]
struct Step {
    command: String,
    expect: Vec<String>,
}

/// Reads the printed walk-through: a bash script whose commands are its non-comment lines,
/// `#    → …` comments under them their results, `# N. …` comments the steps; the banner
/// before step 1 is not part of it.
fn parse(text: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut started = false;
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            assert!(
                !comment.contains(NOT_IN_COMMENTS) && comment.matches('"').count() % 2 == 0,
                "a comment line zsh would act on when pasted: {line}"
            );
            let comment = comment.trim_start();
            let is_heading = comment
                .split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            started |= is_heading;
            if let Some(expect) = comment.strip_prefix("→ ").filter(|_| started) {
                let step = steps.last_mut().expect("a result under a command");
                assert!(step.expect.is_empty(), "two result lines under {step:?}");
                step.expect = expect.split(", ").map(str::to_owned).collect();
            }
            continue;
        }
        if !started || line.trim().is_empty() {
            continue;
        }
        assert!(
            !line.starts_with(char::is_whitespace),
            "an indented line in the script: {line}"
        );
        assert!(
            !line.contains(" # "),
            "a trailing comment breaks zsh pastes: {line}"
        );
        steps.push(Step {
            command: line.to_owned(),
            expect: Vec::new(),
        });
    }
    steps
}

/// grpcurl's exit code for an error status named as grpcurl prints it (`64 + code`).
fn grpcurl_exit(code_name: &str) -> i32 {
    let codes = [
        "Ok",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    let n = codes
        .iter()
        .position(|c| *c == code_name)
        .unwrap_or_else(|| panic!("not a gRPC code: {code_name}"));
    64 + n as i32
}

/// `fragment` occurs in `output`, and not as the start of a longer number or word (`:1`
/// must not be satisfied by `:10`).
fn contains_whole(output: &str, fragment: &str) -> bool {
    output.match_indices(fragment).any(|(at, _)| {
        let next = output[at + fragment.len()..].chars().next();
        let ends_word = fragment.ends_with(|c: char| c.is_alphanumeric());
        !(ends_word && next.is_some_and(|c| c.is_alphanumeric() || c == '_'))
    })
}

/// Reads a child's output into lines on a thread, so the test can wait with a deadline.
fn lines_of(reader: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A process group led by a child of the test, killed on drop so that nothing outlives a
/// failed assertion. The group is signalled only while its leader is unreaped: a zombie still
/// holds its id, so the number cannot have been given to another group.
struct Group {
    child: Child,
    reaped: bool,
}

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        use std::os::unix::process::CommandExt as _;
        Group {
            child: cmd.process_group(0).spawn().expect("spawn"),
            reaped: false,
        }
    }

    /// Sends `signal` to the leader alone.
    fn signal_leader(&self, signal: &str) {
        assert!(!self.reaped);
        let _ = Command::new("kill")
            .args(["-s", signal, "--", &self.child.id().to_string()])
            .status();
    }

    fn kill_group(&self) {
        // `kill -s KILL -- -PGID`. (procps' `kill -KILL -PGID` reads the group as a signal
        // and kills every process it may: never that form.)
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// Once the leader has exited (its output closed): kills what is left of its group, then
    /// reaps it and returns how it exited.
    fn finish(&mut self) -> std::process::ExitStatus {
        self.kill_group();
        self.reaped = true;
        self.child.wait().unwrap()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

/// The stand-ins on the script's `PATH`.
fn stand_ins(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_clerk-grpc-auth"));
    let examples = bin.parent().expect("target dir").join("examples");
    for example in ["in_process", "delegated", "machine_to_machine"] {
        assert!(
            examples.join(example).exists(),
            "{} is not built: run the whole `cargo test` (it builds the examples), or \
             `cargo build --examples` first",
            examples.join(example).display()
        );
    }
    let me = std::env::current_exe().expect("current exe");
    let path = dir.join("bin");
    std::fs::create_dir(&path).unwrap();
    let write = |name: &str, body: String| {
        let file = path.join(name);
        std::fs::write(&file, body).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write(
        "grpcurl",
        format!(
            "#!/bin/sh\nWALKTHROUGH_AS_GRPCURL=1 exec '{}' \"$@\"\n",
            me.display()
        ),
    );
    // `cargo build --release --examples`: already built. `cargo run --release -q [--example X]
    // -- ARGS`: the built program. Anything else is a walk-through this stand-in doesn't know.
    write(
        "cargo",
        format!(
            r#"#!/bin/sh
if [ "$*" = "build --release --examples" ]; then exit 0; fi
[ "$1" = run ] || {{ echo "cargo stand-in: unexpected: $*" >&2; exit 2; }}
shift
program='{bin}'
while [ $# -gt 0 ]; do
  case "$1" in
    --release|-q) shift ;;
    --example) program='{examples}'/"$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "cargo stand-in: unexpected flag $1" >&2; exit 2 ;;
  esac
done
exec "$program" "$@"
"#,
            bin = bin.display(),
            examples = examples.display()
        ),
    );
    path
}

/// How long one walk-through may take in all (it takes seconds).
const DEADLINE: Duration = Duration::from_secs(300);

fn walkthrough(tls: bool) {
    let deadline = Instant::now() + DEADLINE;
    let dir = tempfile::tempdir().unwrap();
    let path = stand_ins(dir.path());

    // `dev` on ports of its own; it prints the addresses it got.
    let mut dev = Command::new(env!("CARGO_BIN_EXE_clerk-grpc-auth"));
    dev.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--emulator-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // The examples' ports, free now (dev only prints them; another program could take one
    // before the example binds it, which fails the test rather than passing it).
    let (a, b) = (
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let port = |l: &std::net::TcpListener| l.local_addr().unwrap().to_string();
    dev.args([
        "--orders-in-process",
        &port(&a),
        "--orders-delegated",
        &port(&b),
    ]);
    drop((a, b));
    if tls {
        dev.arg("--tls");
    }
    let mut dev = Group::spawn(&mut dev);
    let dev_out = lines_of(dev.child.stdout.take().unwrap());
    let dev_err = lines_of(dev.child.stderr.take().unwrap());
    let mut printed = String::new();
    loop {
        let line = dev_out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("dev did not finish its walk-through:\n{printed}"));
        let end = line == END_LINE;
        printed.push_str(&line);
        printed.push('\n');
        if end {
            break;
        }
    }
    let steps = parse(&printed);
    assert!(
        steps.len() > 20,
        "too few commands in the walk-through:\n{printed}"
    );
    if tls {
        assert!(
            steps
                .iter()
                .all(|s| !s.command.contains("-plaintext $AUTH")),
            "--tls prints plaintext commands for AuthService:\n{printed}"
        );
    }
    let certs = steps.iter().find_map(|s| {
        s.command
            .strip_prefix("export CERTS=")
            .map(|d| PathBuf::from(d.trim()))
    });
    assert_eq!(certs.is_some(), tls, "CERTS is set exactly with --tls");

    // The script: each command between markers, its exit code after it.
    // Before the last step (which stops the examples), the script waits while the test stops
    // dev with Ctrl-C: the examples, their revocation streams and connections still attached.
    // The test's pipe moves to fd 3, so no command can read (and eat) the resume line.
    let mut script = String::from("exec 2>&1 3<&0 </dev/null\n");
    for (i, step) in steps.iter().enumerate() {
        if i + 1 == steps.len() {
            script.push_str("echo '@@pause'\nread -r _ <&3\n");
        }
        script.push_str(&format!(
            "echo '@@step {i}'\n{}\nprintf '\\n@@rc %s\\n' $?\n",
            step.command
        ));
    }
    let script_file = dir.path().join("walkthrough.sh");
    std::fs::write(&script_file, &script).unwrap();
    let system_path = std::env::var("PATH").unwrap_or_default();
    let mut bash = Command::new("bash");
    bash.arg("--noprofile")
        .arg("--norc")
        .arg(&script_file)
        .current_dir(dir.path())
        .env("PATH", format!("{}:{system_path}", path.display()))
        // The examples in the background write into the same output: errors only.
        .env("RUST_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut bash = Group::spawn(&mut bash);
    let output = lines_of(bash.child.stdout.take().unwrap());
    let mut resume = bash.child.stdin.take().unwrap();
    let mut dev_log = None;
    let mut transcript = String::new();
    let mut outputs: HashMap<usize, (String, Option<i32>)> = HashMap::new();
    let mut current: Option<usize> = None;
    loop {
        match output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                transcript.push_str(&line);
                transcript.push('\n');
                if line == "@@pause" {
                    dev_log = Some(stop_dev(&mut dev, &dev_err, deadline));
                    use std::io::Write as _;
                    resume.write_all(b"\n").unwrap();
                    resume.flush().unwrap();
                } else if let Some(i) = line.strip_prefix("@@step ") {
                    let i: usize = i.parse().unwrap();
                    current = Some(i);
                    outputs.insert(i, (String::new(), None));
                } else if let Some(rc) = line.strip_prefix("@@rc ") {
                    let i = current.take().expect("an exit code after a step");
                    outputs.get_mut(&i).unwrap().1 = Some(rc.parse().unwrap());
                } else if let Some(i) = current {
                    let out = &mut outputs.get_mut(&i).unwrap().0;
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the walk-through hangs; so far:\n{transcript}")
            }
        }
    }
    let status = bash.finish();
    assert!(status.success(), "bash: {status}\n{transcript}");

    // Every step's result, all failures at once.
    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let Some((out, Some(rc))) = outputs.get(&i) else {
            failures.push(format!(
                "step {i} did not run to its end: `{}`",
                step.command
            ));
            continue;
        };
        let want_rc = if step.expect.iter().any(|e| e.starts_with("Failed")) {
            1
        } else {
            step.expect
                .iter()
                .find_map(|e| e.strip_prefix("Code: "))
                .map_or(0, grpcurl_exit)
        };
        if *rc != want_rc {
            failures.push(format!(
                "`{}` exited {rc}, documented {want_rc}; it printed:\n{out}",
                step.command
            ));
        }
        for fragment in &step.expect {
            if !contains_whole(out, fragment) {
                failures.push(format!(
                    "`{}` does not print `{fragment}`; it printed:\n{out}",
                    step.command
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} commands did not do as documented:\n\n{}",
        failures.len(),
        steps.len(),
        failures.join("\n")
    );

    let log = dev_log.expect("the script paused for dev to stop");
    assert!(
        !log.contains("drain deadline passed"),
        "the drain waited for its deadline:\n{log}"
    );
    assert!(log.contains("stopped"), "no stop logged:\n{log}");
    if let Some(certs) = certs {
        assert!(!certs.exists(), "dev left its certificates behind");
    }
}

/// Ctrl-C (SIGINT) to dev: it must exit by itself, successfully; returns what it logged.
fn stop_dev(dev: &mut Group, log: &mpsc::Receiver<String>, deadline: Instant) -> String {
    dev.signal_leader("INT");
    let mut seen = String::new();
    loop {
        match log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("dev does not stop:\n{seen}"),
        }
    }
    let status = dev.finish();
    assert!(status.success(), "dev exited {status}:\n{seen}");
    seen
}
