//! Hostile policy for the host's safety tests. `mode` parameter: 0 honest, 1 infinite loop,
//! 2 memory bomb, 3 trap, 4 accepted > k, 5 token >= vocab, 6 call a WASI import it was not
//! given, 7 unbounded recursion.
use verdict_policy_sdk::*;

struct Hostile;

const VERSION: &str = if cfg!(feature = "v2") {
    "2.0.0"
} else {
    "1.0.0"
};
const TAG: u32 = if cfg!(feature = "v2") { 2 } else { 1 };

impl Policy for Hostile {
    fn info() -> Info {
        if cfg!(feature = "info-loop") {
            spin();
        }
        let name = if cfg!(feature = "huge-info") {
            // Big enough to exceed every host limit, small enough to build within the fuel budget.
            "x".repeat(256 << 10)
        } else {
            "hostile".to_string()
        };
        let mut i = info(&name, VERSION)
            .param(integer("mode", 0, 0, 7, "which misbehaviour"))
            .build();
        if cfg!(feature = "bad-info") {
            i.params
                .push(real("bad", 5.0, 0.0, 1.0, "default out of range"));
        }
        i
    }

    fn verify(step: Step) -> Verdict {
        let k = k(&step) as u32;
        match param_or(&step, "mode", 0.0) as i64 {
            1 => spin(),
            2 => {
                // Reserve (not touch) 16 MiB at a time: memory.grow until the host says no.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut v = Vec::with_capacity(16 << 20);
                    v.push(1u8);
                    hoard.push(std::hint::black_box(v));
                }
            }
            3 => panic!("hostile policy panics"),
            4 => verdict(k + 1, Correction::Argmax),
            5 => verdict(0, Correction::Token(step.vocab_size)),
            6 => {
                let t = std::time::SystemTime::now();
                verdict(
                    std::hint::black_box(t).elapsed().map_or(0, |_| 0),
                    Correction::Argmax,
                )
            }
            7 => verdict(recurse(std::hint::black_box(1)) as u32, Correction::Argmax),
            _ => verdict(k.min(TAG), Correction::Token(TAG)),
        }
    }
}

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let buf = std::hint::black_box([n; 64]);
    recurse(buf[3] + 1) + buf[7]
}

export_policy!(Hostile);
