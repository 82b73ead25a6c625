use std::time::Instant;

unsafe fn call(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (m, n_in, n_out): (usize, usize, usize) = (
        args[1].parse().unwrap(),
        args[2].parse().unwrap(),
        args[3].parse().unwrap(),
    );
    let x: Vec<f32> = (0..m * n_in)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<f32> = (0..n_out * n_in)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut wt = vec![0.0f32; n_in * n_out];
    for o in 0..n_out {
        for i in 0..n_in {
            wt[i * n_out + o] = w[o * n_in + i];
        }
    }
    let mut z = vec![0.0f32; m * n_out];
    let mut z2 = vec![0.0f32; m * n_out];
    let reps = 3000;
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..50 {
            f();
        }
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64 * 1e6
    };
    let flops = 2.0 * (m * n_in * n_out) as f64;
    let a = time(&mut || unsafe {
        call(
            m,
            n_out,
            n_in,
            z.as_mut_ptr(),
            (x.as_ptr(), n_in as isize, 1),
            (w.as_ptr(), 1, n_in as isize),
        )
    });
    let b = time(&mut || unsafe {
        call(
            m,
            n_out,
            n_in,
            z2.as_mut_ptr(),
            (x.as_ptr(), n_in as isize, 1),
            (wt.as_ptr(), n_out as isize, 1),
        )
    });
    assert!(z.iter().zip(&z2).all(|(a, b)| (a - b).abs() < 1e-3));
    let tr2 = time(&mut || {
        unsafe { transpose_v4(&w, n_out, n_in, &mut wt) };
        std::hint::black_box(&wt);
    });
    let mut wt3 = vec![0.0f32; n_in * n_out];
    let tr3 = time(&mut || {
        unsafe { transpose_avx(&w, n_out, n_in, &mut wt3) };
        std::hint::black_box(&wt3);
    });
    assert_eq!(wt, wt3);
    println!("fast transpose {tr2:.1}us avx {tr3:.1}us");
    let tr = time(&mut || {
        const T: usize = 16;
        for o0 in (0..n_out).step_by(T) {
            for i0 in (0..n_in).step_by(T) {
                for o in o0..(o0 + T).min(n_out) {
                    for i in i0..(i0 + T).min(n_in) {
                        wt[i * n_out + o] = w[o * n_in + i];
                    }
                }
            }
        }
        std::hint::black_box(&wt);
    });
    gemm::set_lhs_packing_threshold_single_thread(256);
    let c = time(&mut || unsafe {
        call(
            m,
            n_out,
            n_in,
            z2.as_mut_ptr(),
            (x.as_ptr(), n_in as isize, 1),
            (wt.as_ptr(), n_out as isize, 1),
        )
    });
    let d = time(&mut || unsafe {
        call(
            m,
            n_out,
            n_in,
            z.as_mut_ptr(),
            (x.as_ptr(), n_in as isize, 1),
            (w.as_ptr(), 1, n_in as isize),
        )
    });
    // backward dx = dz W (m x out)(out x in) and dW = dz^T x
    gemm::set_lhs_packing_threshold_single_thread(8);
    let mut dx = vec![0.0f32; m * n_in];
    let mut dw = vec![0.0f32; n_out * n_in];
    let e = time(&mut || unsafe {
        call(
            m,
            n_in,
            n_out,
            dx.as_mut_ptr(),
            (z.as_ptr(), n_out as isize, 1),
            (w.as_ptr(), n_in as isize, 1),
        )
    });
    let f = time(&mut || unsafe {
        call(
            n_out,
            n_in,
            m,
            dw.as_mut_ptr(),
            (z.as_ptr(), 1, n_out as isize),
            (x.as_ptr(), n_in as isize, 1),
        )
    });
    gemm::set_lhs_packing_threshold_single_thread(256);
    let g = time(&mut || unsafe {
        call(
            m,
            n_in,
            n_out,
            dx.as_mut_ptr(),
            (z.as_ptr(), n_out as isize, 1),
            (w.as_ptr(), n_in as isize, 1),
        )
    });
    let h = time(&mut || unsafe {
        call(
            n_out,
            n_in,
            m,
            dw.as_mut_ptr(),
            (z.as_ptr(), 1, n_out as isize),
            (x.as_ptr(), n_in as isize, 1),
        )
    });
    let gf = |us: f64| flops / us / 1e3;
    println!("fwd current {a:.1}us ({:.0} GF) | Wt {b:.1}us ({:.0}) | transpose {tr:.1}us | Wt+nopack {c:.1}us ({:.0}) | current+thr256 {d:.1} ({:.0})", gf(a), gf(b), gf(c), gf(d));
    println!(
        "bwd dx {e:.1}us ({:.0}) dW {f:.1}us ({:.0}) | thr256: dx {g:.1} ({:.0}) dW {h:.1} ({:.0})",
        gf(e),
        gf(f),
        gf(g),
        gf(h)
    );
}

#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
pub unsafe fn transpose_v4(w: &[f32], n_out: usize, n_in: usize, t: &mut [f32]) {
    transpose_body(w, n_out, n_in, t)
}

#[inline(always)]
fn transpose_body(w: &[f32], n_out: usize, n_in: usize, t: &mut [f32]) {
    const B: usize = 8;
    let (fo, fi) = (n_out / B * B, n_in / B * B);
    for o0 in (0..fo).step_by(B) {
        for i0 in (0..fi).step_by(B) {
            let mut tile = [[0.0f32; B]; B];
            for r in 0..B {
                tile[r].copy_from_slice(&w[(o0 + r) * n_in + i0..][..B]);
            }
            for c in 0..B {
                let row = &mut t[(i0 + c) * n_out + o0..][..B];
                for r in 0..B {
                    row[r] = tile[r][c];
                }
            }
        }
    }
    for o in 0..n_out {
        for i in 0..n_in {
            if o >= fo || i >= fi {
                t[i * n_out + o] = w[o * n_in + i];
            }
        }
    }
}

#[target_feature(enable = "avx")]
pub unsafe fn transpose_avx(w: &[f32], n_out: usize, n_in: usize, t: &mut [f32]) {
    use std::arch::x86_64::*;
    let (fo, fi) = (n_out / 8 * 8, n_in / 8 * 8);
    let (wp, tp) = (w.as_ptr(), t.as_mut_ptr());
    for o0 in (0..fo).step_by(8) {
        for i0 in (0..fi).step_by(8) {
            let s = wp.add(o0 * n_in + i0);
            let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add(k * n_in)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let d = tp.add(i0 * n_out + o0);
            _mm256_storeu_ps(d, _mm256_permute2f128_ps::<0x20>(u0, u4));
            _mm256_storeu_ps(d.add(n_out), _mm256_permute2f128_ps::<0x20>(u1, u5));
            _mm256_storeu_ps(d.add(2 * n_out), _mm256_permute2f128_ps::<0x20>(u2, u6));
            _mm256_storeu_ps(d.add(3 * n_out), _mm256_permute2f128_ps::<0x20>(u3, u7));
            _mm256_storeu_ps(d.add(4 * n_out), _mm256_permute2f128_ps::<0x31>(u0, u4));
            _mm256_storeu_ps(d.add(5 * n_out), _mm256_permute2f128_ps::<0x31>(u1, u5));
            _mm256_storeu_ps(d.add(6 * n_out), _mm256_permute2f128_ps::<0x31>(u2, u6));
            _mm256_storeu_ps(d.add(7 * n_out), _mm256_permute2f128_ps::<0x31>(u3, u7));
        }
    }
}
