use std::time::{Duration, Instant, SystemTime};
use wglb_lab::{require_root, Family, Rig, RigSpec};

#[test]
fn many_rigs_in_parallel() {
    require_root().unwrap();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|k| {
            std::thread::spawn(move || {
                let mut rig = Rig::new(RigSpec {
                    family: if k % 2 == 0 { Family::V4 } else { Family::V6 },
                    gateways: 3,
                    client_ports: vec![41000, 41001, 41002],
                    keepalive: Some(1),
                })
                .unwrap();
                let built = t0.elapsed();
                for i in 0..3 {
                    rig.start_client(i).unwrap();
                }
                let p = rig.pinger(0).unwrap();
                std::thread::sleep(Duration::from_millis(500));
                assert!(p.replies().is_empty());
                assert!(p.sent() >= 1, "sent {}", p.sent());
                assert!(rig.wait_handshake(1, Duration::from_millis(300)).is_err());
                let id = rig.id().to_owned();
                drop(p);
                drop(rig);
                (id, built)
            })
        })
        .collect();
    for h in handles {
        println!("{:?}", h.join().unwrap());
    }
    println!("total {:?}", t0.elapsed());
    let _ = SystemTime::now();
}
