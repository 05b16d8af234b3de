//! `niah.png`: the recall heatmap of `eval niah` in the style of Gemini 1.5's figure — context
//! length across (one column per length, in increasing order, so a log scale for the usual
//! doubling lengths), needle depth down, colour from red (0 % recall) through yellow to green
//! (100 %). Written without a plotting stack: a PNG encoder (zlib with fixed-Huffman deflate,
//! runs as back-references) and a 5×7 bitmap font for the labels.

/// Draws the heatmap of `recall[depth][length]` (each in [0, 1]) with the given axis labels,
/// a title (scaled ×2) and a note under the length axis.
pub fn render(
    lengths: &[String],
    depths: &[String],
    recall: &[Vec<f64>],
    title: &str,
    note: &str,
) -> Vec<u8> {
    const CELL_W: usize = 56;
    const CELL_H: usize = 26;
    const LEFT: usize = 64;
    const TOP: usize = 40;
    const BOTTOM: usize = 56;
    const RIGHT: usize = 24;
    let (nx, ny) = (lengths.len().max(1), depths.len().max(1));
    let w = (LEFT + nx * CELL_W + RIGHT)
        .max(LEFT + 12 * title.chars().count() + 8)
        .max(LEFT + 6 * note.chars().count() + 8);
    let h = TOP + ny * CELL_H + BOTTOM + 14;
    let mut img = Image::new(w, h, [255, 255, 255]);
    img.text(LEFT, 14, title, 2, [0, 0, 0]);
    for (y, row) in recall.iter().enumerate().take(ny) {
        for (x, &r) in row.iter().enumerate().take(nx) {
            let (x0, y0) = (LEFT + x * CELL_W, TOP + y * CELL_H);
            img.rect(x0, y0, CELL_W - 1, CELL_H - 1, colour(r));
            let pct = format!("{:.0}", 100.0 * r);
            img.text(
                x0 + (CELL_W - pct.len() * 6) / 2,
                y0 + 9,
                &pct,
                1,
                [0, 0, 0],
            );
        }
    }
    for (y, d) in depths.iter().enumerate().take(ny) {
        img.text(
            LEFT - 6 - d.len() * 6,
            TOP + y * CELL_H + 9,
            d,
            1,
            [0, 0, 0],
        );
    }
    for (x, l) in lengths.iter().enumerate().take(nx) {
        let x0 = LEFT + x * CELL_W + (CELL_W.saturating_sub(l.len() * 6)) / 2;
        img.text(x0, TOP + ny * CELL_H + 8, l, 1, [0, 0, 0]);
    }
    img.text(
        LEFT,
        TOP + ny * CELL_H + 30,
        "CONTEXT LENGTH (TOKENS)",
        1,
        [0, 0, 0],
    );
    img.text(LEFT, TOP + ny * CELL_H + 46, note, 1, [90, 90, 90]);
    img.text(4, TOP - 12, "DEPTH", 1, [0, 0, 0]);
    img.png()
}

/// Points `(x, y)` and the colour of their line.
pub type Series<'a> = (&'a [(f64, f64)], [u8; 3]);

/// Draws `series` (points `(x, y)` with x, y > 0, and a colour each) as lines on log-log axes,
/// decade ticks labelled, with a title and a note under the x axis.
pub fn render_lines(title: &str, series: &[Series<'_>], note: &str) -> Vec<u8> {
    const LEFT: usize = 64;
    const TOP: usize = 40;
    const PW: usize = 480;
    const PH: usize = 280;
    let (w, h) = (LEFT + PW + 24, TOP + PH + 60);
    let mut img = Image::new(w, h, [255, 255, 255]);
    img.text(LEFT, 14, title, 2, [0, 0, 0]);
    let pts = || {
        series
            .iter()
            .flat_map(|(p, _)| p.iter())
            .filter(|(x, y)| *x > 0.0 && *y > 0.0 && x.is_finite() && y.is_finite())
    };
    let range = |f: &dyn Fn(&(f64, f64)) -> f64| {
        let (lo, hi) = pts()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        if lo.is_finite() {
            (
                lo.log10().floor(),
                hi.log10().ceil().max(lo.log10().floor() + 1.0),
            )
        } else {
            (0.0, 1.0)
        }
    };
    let (x0, x1) = range(&|p| p.0);
    let (y0, y1) = range(&|p| p.1);
    let px = |x: f64| LEFT as f64 + (x.log10() - x0) / (x1 - x0) * PW as f64;
    let py = |y: f64| (TOP + PH) as f64 - (y.log10() - y0) / (y1 - y0) * PH as f64;
    let grey = [200, 200, 200];
    for d in x0 as i32..=x1 as i32 {
        let x = px(10f64.powi(d)) as usize;
        img.rect(x, TOP, 1, PH, grey);
        let label = decade(d);
        img.text(
            x.saturating_sub(label.len() * 3),
            TOP + PH + 6,
            &label,
            1,
            [0, 0, 0],
        );
    }
    for d in y0 as i32..=y1 as i32 {
        let y = py(10f64.powi(d)) as usize;
        img.rect(LEFT, y, PW, 1, grey);
        let label = decade(d);
        img.text(
            LEFT.saturating_sub(6 + label.len() * 6),
            y.saturating_sub(3),
            &label,
            1,
            [0, 0, 0],
        );
    }
    img.rect(LEFT, TOP, 1, PH, [0, 0, 0]);
    img.rect(LEFT, TOP + PH, PW, 1, [0, 0, 0]);
    for (points, c) in series {
        let mut last: Option<(f64, f64)> = None;
        for &(x, y) in points.iter().filter(|(x, y)| *x > 0.0 && *y > 0.0) {
            let p = (px(x), py(y));
            if let Some(q) = last {
                img.line(q, p, *c);
            }
            last = Some(p);
        }
    }
    img.text(LEFT, TOP + PH + 22, "POSITION (TOKENS)", 1, [0, 0, 0]);
    img.text(LEFT, TOP + PH + 38, note, 1, [90, 90, 90]);
    img.png()
}

/// `10^d` as a short label: 1, 10, 100, 1K, 10K, 100K, 1M, …; 0.1, 0.01, … below 1.
fn decade(d: i32) -> String {
    match d {
        i32::MIN..=-1 => format!("{}", 10f64.powi(d)),
        0..=2 => format!("{}", 10i64.pow(d as u32)),
        3..=5 => format!("{}K", 10i64.pow(d as u32 - 3)),
        6..=8 => format!("{}M", 10i64.pow(d as u32 - 6)),
        _ => format!("1E{d}"),
    }
}

/// Red (0) → yellow (0.5) → green (1).
fn colour(r: f64) -> [u8; 3] {
    let r = if r.is_finite() {
        r.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (red, green) = if r < 0.5 {
        (220.0, 60.0 + 380.0 * r)
    } else {
        (220.0 - 360.0 * (r - 0.5), 250.0 - 60.0 * (r - 0.5))
    };
    [red as u8, green as u8, 70]
}

struct Image {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Image {
    fn new(w: usize, h: usize, bg: [u8; 3]) -> Self {
        Self {
            w,
            h,
            px: vec![bg; w * h],
        }
    }

    fn rect(&mut self, x0: usize, y0: usize, w: usize, h: usize, c: [u8; 3]) {
        for y in y0..(y0 + h).min(self.h) {
            for x in x0..(x0 + w).min(self.w) {
                self.px[y * self.w + x] = c;
            }
        }
    }

    /// A 2-pixel line from `a` to `b` (pixel coordinates; parts outside are clipped).
    fn line(&mut self, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
        let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            if x >= 0.0 && y >= 0.0 {
                self.rect(x as usize, y as usize, 2, 2, c);
            }
        }
    }

    /// `s` in the 5×7 font at `scale`, top-left at (x, y); lower case prints as upper case.
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let px = x + (i * 6 + col) * scale;
                        self.rect(px, y + row * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// The image as a PNG file: RGB, 8 bits, filter 0 on every row.
    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.h * (1 + 3 * self.w));
        for row in self.px.chunks(self.w) {
            raw.push(0);
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib(&raw));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// LSB-first bit writer for deflate.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, which deflate stores most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let rev = code.reverse_bits() >> (32 - len);
        self.put(rev, len);
    }

    /// A literal/length symbol of the fixed Huffman code.
    fn sym(&mut self, s: u32) {
        match s {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + s - 144, 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xc0 + s - 280, 8),
        }
    }
}

/// Length codes 257..=285: (base length, extra bits).
const LENGTHS: [(u32, u32); 29] = [
    (3, 0),
    (4, 0),
    (5, 0),
    (6, 0),
    (7, 0),
    (8, 0),
    (9, 0),
    (10, 0),
    (11, 1),
    (13, 1),
    (15, 1),
    (17, 1),
    (19, 2),
    (23, 2),
    (27, 2),
    (31, 2),
    (35, 3),
    (43, 3),
    (51, 3),
    (59, 3),
    (67, 4),
    (83, 4),
    (99, 4),
    (115, 4),
    (131, 5),
    (163, 5),
    (195, 5),
    (227, 5),
    (258, 0),
];

/// Distance codes 0..=29: (base distance, extra bits).
const DISTANCES: [(u32, u32); 30] = [
    (1, 0),
    (2, 0),
    (3, 0),
    (4, 0),
    (5, 1),
    (7, 1),
    (9, 2),
    (13, 2),
    (17, 3),
    (25, 3),
    (33, 4),
    (49, 4),
    (65, 5),
    (97, 5),
    (129, 6),
    (193, 6),
    (257, 7),
    (385, 7),
    (513, 8),
    (769, 8),
    (1025, 9),
    (1537, 9),
    (2049, 10),
    (3073, 10),
    (4097, 11),
    (6145, 11),
    (8193, 12),
    (12289, 12),
    (16385, 13),
    (24577, 13),
];

/// zlib stream of one fixed-Huffman deflate block. Matches are repeats at distance 3 (the
/// previous pixel) or 1 (a run of one byte): what a chart's flat regions need.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // final block
    b.put(1, 2); // fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let mut best = (0usize, 0usize);
        for dist in [3usize, 1] {
            if i >= dist {
                let mut l = 0;
                while l < 258 && i + l < data.len() && data[i + l] == data[i + l - dist] {
                    l += 1;
                }
                if l > best.0 {
                    best = (l, dist);
                }
            }
        }
        if best.0 >= 3 {
            let (len, dist) = (best.0 as u32, best.1 as u32);
            let li = LENGTHS
                .iter()
                .rposition(|&(base, _)| base <= len)
                .unwrap_or(0);
            b.sym(257 + li as u32);
            b.put(len - LENGTHS[li].0, LENGTHS[li].1);
            let di = DISTANCES
                .iter()
                .rposition(|&(base, _)| base <= dist)
                .unwrap_or(0);
            b.code(di as u32, 5);
            b.put(dist - DISTANCES[di].0, DISTANCES[di].1);
            i += best.0;
        } else {
            b.sym(u32::from(data[i]));
            i += 1;
        }
    }
    b.sym(256);
    if b.n > 0 {
        b.out.push(b.acc as u8);
    }
    let (mut s1, mut s2) = (1u32, 0u32);
    for &x in data {
        s1 = (s1 + u32::from(x)) % 65521;
        s2 = (s2 + s1) % 65521;
    }
    b.out.extend_from_slice(&((s2 << 16) | s1).to_be_bytes());
    b.out
}

/// Rows of a 5×7 glyph, the high bit of 5 leftmost.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inflates a zlib stream of fixed-Huffman blocks (what `zlib` writes), for the round trip.
    fn inflate(z: &[u8]) -> Vec<u8> {
        let data = &z[2..z.len() - 4];
        let (mut pos, mut out) = (0usize, Vec::new());
        let bit = |pos: &mut usize| -> u32 {
            let b = (data[*pos / 8] >> (*pos % 8)) & 1;
            *pos += 1;
            u32::from(b)
        };
        let bits = |pos: &mut usize, n: u32| -> u32 { (0..n).map(|i| bit(pos) << i).sum() };
        let code = |pos: &mut usize, n: u32| -> u32 { (0..n).fold(0, |c, _| (c << 1) | bit(pos)) };
        assert_eq!(bits(&mut pos, 3), 0b011);
        loop {
            let mut c = code(&mut pos, 7);
            let sym = if c <= 0x17 {
                c + 256
            } else {
                c = (c << 1) | bit(&mut pos);
                if (0x30..=0xbf).contains(&c) {
                    c - 0x30
                } else if (0xc0..=0xc7).contains(&c) {
                    c - 0xc0 + 280
                } else {
                    ((c << 1) | bit(&mut pos)) - 0x190 + 144
                }
            };
            match sym {
                0..=255 => out.push(sym as u8),
                256 => break,
                _ => {
                    let (base, extra) = LENGTHS[(sym - 257) as usize];
                    let len = base + bits(&mut pos, extra);
                    let (db, de) = DISTANCES[code(&mut pos, 5) as usize];
                    let dist = (db + bits(&mut pos, de)) as usize;
                    for _ in 0..len {
                        out.push(out[out.len() - dist]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn deflate_round_trips_and_compresses_flat_images() {
        let mut data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        data.extend(std::iter::repeat_n([10u8, 200, 30], 4000).flatten());
        data.extend([1, 1, 2, 2, 2, 2, 9]);
        let z = zlib(&data);
        assert_eq!(inflate(&z), data);
        assert!(z.len() < 5000 + 12000 / 20, "{} bytes", z.len());
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn the_heatmap_is_a_png_of_the_expected_size() {
        let png = render(
            &["1K".into(), "1M".into()],
            &["0".into(), "0.5".into(), "1".into()],
            &[vec![1.0, 0.5], vec![1.0, 0.0], vec![0.8, 1.0]],
            "recall",
            "",
        );
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
        let h = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
        assert_eq!((w, h), (64 + 2 * 56 + 24, 40 + 3 * 26 + 56 + 14));
        assert_eq!(colour(0.0), [220, 60, 70]);
        assert_eq!(colour(1.0)[0], 40);
    }
}
