//! One communicator rank as its own OS process, for multi-process TCP tests.
//!
//! Joins through `ringmoe_comm::launch` (prints `PORT`, reads `PEERS`), runs the scenario, print `OK <ms>` or `ERR <ms> <message>` and exit 0 or 1. During the
//! fault scenarios the rank prints `ITER <i>` after each iteration so the parent can pick when to
//! kill or stop one of them.

use std::io::Write;
use std::time::{Duration, Instant};

use ringmoe_comm::{Kind, Payload, Tag, TcpOptions, launch, testkit};

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ringmoe-comm-rank: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rank: usize = get("--rank")
        .ok_or("--rank missing")?
        .parse()
        .map_err(|e| format!("--rank: {e}"))?;
    let scenario = get("--scenario").unwrap_or_else(|| "all".into());
    let timeout = Duration::from_millis(
        get("--timeout-ms")
            .unwrap_or_else(|| "30000".into())
            .parse()
            .map_err(|e| format!("{e}"))?,
    );
    let bytes: usize = get("--bytes")
        .unwrap_or_else(|| "1048576".into())
        .parse()
        .map_err(|e| format!("{e}"))?;

    let mut out = std::io::stdout().lock();
    let t0 = Instant::now();
    let opts = TcpOptions {
        session: 7,
        ..TcpOptions::default()
    };
    let result = launch::join_tcp(rank, &opts, timeout)
        .map_err(|e| e.to_string())
        .and_then(|comm| match scenario.as_str() {
            "all" => testkit::exercise_all(&comm, 42, 2),
            "fault-a2a" | "fault-ring" => {
                let n = comm.world_size();
                let elems = bytes / 4;
                for i in 0..100_000u32 {
                    if scenario == "fault-a2a" {
                        let sends = (0..n)
                            .map(|_| Payload::f32(vec![i as f32; elems]))
                            .collect();
                        comm.all_to_all_v(Tag::new(1, 0, i, Kind::Dispatch), sends)
                            .map_err(|e| e.to_string())?;
                    } else {
                        let (next, prev) = ((comm.rank() + 1) % n, (comm.rank() + n - 1) % n);
                        comm.sendrecv(
                            next,
                            Payload::f32(vec![i as f32; elems]),
                            prev,
                            Tag::new(1, 0, i, Kind::Ring),
                        )
                        .map_err(|e| e.to_string())?;
                    }
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(o, "ITER {i}").and_then(|_| o.flush());
                }
                Ok(())
            }
            other => Err(format!("unknown scenario {other}")),
        });
    let ms = t0.elapsed().as_millis();
    let code = i32::from(result.is_err());
    match result {
        Ok(()) => writeln!(out, "OK {ms}"),
        Err(e) => writeln!(out, "ERR {ms} {e}"),
    }
    .and_then(|_| out.flush())
    .map_err(|e| e.to_string())?;
    drop(out);
    std::process::exit(code)
}
