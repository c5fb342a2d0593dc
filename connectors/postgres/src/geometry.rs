//! PostgreSQL's built-in geometric types as Debezium's geometry structs.
//!
//! Contract: one datum yields one [`Value`] whichever way it arrives. The text output (pgoutput,
//! COPY text) and the binary send format (COPY binary) are both read into a [`Figure`] of `f64`
//! coordinates, and only [`Figure::value`] builds values, so the two paths cannot drift apart. The
//! text is PostgreSQL's canonical output (`point_out`, `box_out`, ...); with the session's
//! `extra_float_digits=3` every coordinate's text parses back to the exact stored double.
//!
//! The rendering is that of Debezium's PostgreSQL connector (`PostgresValueConverter.convertPoint`,
//! `convertBox`, `convertLseg`, `convertPath`, `convertPolygon`, `convertCircle`, `convertLine`,
//! with `io.debezium.spatial.WkbWriter`), through the JSON converter:
//!
//! | type | JSON |
//! |---|---|
//! | `point` | `{"x", "y", "wkb", "srid": null}` (`io.debezium.data.geometry.Point`) |
//! | `box` | `{"wkb", "srid": null, "extensions": {"type": "box"}}` (`Geometry`): a Polygon ring through the four corners, starting and ending at the first corner written |
//! | `lseg` | the same with `"type": "lseg"`: a LineString of its two points |
//! | `path` | the same with `{"type": "path", "closed": "true"\|"false"}`: a LineString of its points, open or closed |
//! | `polygon` | the same with `"type": "polygon"`: a Polygon of one ring, closed by repeating the first point when the last differs |
//! | `circle` | `{"center": <point as above>, "radius"}` (`io.debezium.data.geometry.Circle`) |
//! | `line` | `{"a", "b", "c"}` (`io.debezium.data.geometry.Line`) for `Ax + By + C = 0` |
//!
//! WKB is little-endian 2D (byte order 1, then the type: 1 Point, 2 LineString, 3 Polygon), as
//! Debezium writes it. Debezium maps every type here but `point` this way from 3.7.0
//! (debezium/dbz#2135); its earlier releases leave them out of events unless
//! `include.unknown.datatypes` is set.

use tailgate_core::Value;

/// A geometric type, resolved from the column's type oid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Point,
    Lseg,
    Path,
    Box,
    Polygon,
    Line,
    Circle,
}

/// `(x, y)`.
type Point = (f64, f64);

/// One geometric datum, as read from either format.
#[derive(Debug, Clone, PartialEq)]
pub enum Figure {
    Point(Point),
    Lseg(Point, Point),
    /// The two corners in the order PostgreSQL writes them (upper right, then lower left).
    Box(Point, Point),
    Path {
        closed: bool,
        points: Vec<Point>,
    },
    Polygon(Vec<Point>),
    Line {
        a: f64,
        b: f64,
        c: f64,
    },
    Circle {
        center: Point,
        radius: f64,
    },
}

impl Shape {
    /// The shape of the built-in type `oid`, if it is one.
    pub fn of(oid: u32) -> Option<Shape> {
        Some(match oid {
            600 => Shape::Point,
            601 => Shape::Lseg,
            602 => Shape::Path,
            603 => Shape::Box,
            604 => Shape::Polygon,
            628 => Shape::Line,
            718 => Shape::Circle,
            _ => return None,
        })
    }

    /// Reads the type's text output: `(x,y)`, `[(x,y),(x,y)]`, `(x,y),(x,y)`, `[(x,y),...]` (open
    /// path), `((x,y),...)` (closed path, polygon), `{a,b,c}`, `<(x,y),r>`. `None` if the text is
    /// not of that form.
    pub fn parse_text(self, text: &str) -> Option<Figure> {
        Some(match self {
            Shape::Point => match point_prefix(text)? {
                (p, "") => Figure::Point(p),
                _ => return None,
            },
            Shape::Box => {
                let (p, q) = two_points(text)?;
                Figure::Box(p, q)
            }
            Shape::Lseg => {
                let (p, q) = two_points(text.strip_prefix('[')?.strip_suffix(']')?)?;
                Figure::Lseg(p, q)
            }
            Shape::Path => {
                let (closed, inner) = match (text.strip_prefix('['), text.strip_prefix('(')) {
                    (Some(rest), _) => (false, rest.strip_suffix(']')?),
                    (None, Some(rest)) => (true, rest.strip_suffix(')')?),
                    (None, None) => return None,
                };
                Figure::Path { closed, points: point_list(inner)? }
            }
            Shape::Polygon => Figure::Polygon(point_list(text.strip_prefix('(')?.strip_suffix(')')?)?),
            Shape::Line => {
                let mut parts = text.strip_prefix('{')?.strip_suffix('}')?.split(',');
                let (a, b, c) = (number(parts.next()?)?, number(parts.next()?)?, number(parts.next()?)?);
                if parts.next().is_some() {
                    return None;
                }
                Figure::Line { a, b, c }
            }
            Shape::Circle => {
                let (center, rest) = point_prefix(text.strip_prefix('<')?.strip_suffix('>')?)?;
                Figure::Circle { center, radius: number(rest.strip_prefix(',')?)? }
            }
        })
    }

    /// Reads the type's binary send format: big-endian float8 coordinates; a path starts with a
    /// closed flag byte and a point count (int4), a polygon with a point count. `None` if the
    /// length does not fit.
    pub fn parse_binary(self, raw: &[u8]) -> Option<Figure> {
        let floats = |raw: &[u8], n: usize| -> Option<Vec<f64>> {
            if raw.len() != 8 * n {
                return None;
            }
            raw.chunks_exact(8).map(|b| b.try_into().ok().map(f64::from_be_bytes)).collect()
        };
        let points = |raw: &[u8]| -> Option<Vec<Point>> {
            let (count, rest) = raw.split_first_chunk::<4>()?;
            let count = usize::try_from(i32::from_be_bytes(*count)).ok()?;
            Some(floats(rest, count.checked_mul(2)?)?.chunks_exact(2).map(|p| (p[0], p[1])).collect())
        };
        Some(match self {
            Shape::Point => match floats(raw, 2)?[..] {
                [x, y] => Figure::Point((x, y)),
                _ => return None,
            },
            Shape::Lseg | Shape::Box => match floats(raw, 4)?[..] {
                [x1, y1, x2, y2] if self == Shape::Lseg => Figure::Lseg((x1, y1), (x2, y2)),
                [x1, y1, x2, y2] => Figure::Box((x1, y1), (x2, y2)),
                _ => return None,
            },
            Shape::Path => {
                let (closed, rest) = raw.split_first()?;
                Figure::Path { closed: *closed != 0, points: points(rest)? }
            }
            Shape::Polygon => Figure::Polygon(points(raw)?),
            Shape::Line => match floats(raw, 3)?[..] {
                [a, b, c] => Figure::Line { a, b, c },
                _ => return None,
            },
            Shape::Circle => match floats(raw, 3)?[..] {
                [x, y, radius] => Figure::Circle { center: (x, y), radius },
                _ => return None,
            },
        })
    }
}

impl Figure {
    /// The value Debezium emits for this datum (see the module documentation).
    pub fn value(&self) -> Value {
        match self {
            Figure::Point(p) => point_value(*p),
            Figure::Lseg(p, q) => geometry(line_string(&[*p, *q]), "lseg", None),
            Figure::Box((x1, y1), (x2, y2)) => {
                // Debezium's ring: corner 1, then round the rectangle back to corner 1.
                let ring = [(*x1, *y1), (*x1, *y2), (*x2, *y2), (*x2, *y1), (*x1, *y1)];
                geometry(polygon(&ring), "box", None)
            }
            Figure::Path { closed, points } => geometry(line_string(points), "path", Some(*closed)),
            Figure::Polygon(points) => {
                let mut ring = points.clone();
                // Compared as Java compares doubles (`!=`), so that a ring closes exactly when Debezium's does.
                if let (Some(first), Some(last)) = (ring.first().copied(), ring.last().copied())
                    && ring.len() >= 2
                    && (first.0 != last.0 || first.1 != last.1)
                {
                    ring.push(first);
                }
                geometry(polygon(&ring), "polygon", None)
            }
            Figure::Line { a, b, c } => {
                Value::Struct(vec![("a", Value::Float(*a)), ("b", Value::Float(*b)), ("c", Value::Float(*c))])
            }
            Figure::Circle { center, radius } => {
                Value::Struct(vec![("center", point_value(*center)), ("radius", Value::Float(*radius))])
            }
        }
    }
}

/// `io.debezium.data.geometry.Point`: the coordinates, their WKB, no SRID.
fn point_value((x, y): Point) -> Value {
    let mut wkb = Vec::with_capacity(21);
    wkb_header(&mut wkb, WKB_POINT);
    push_point(&mut wkb, (x, y));
    Value::Struct(vec![
        ("x", Value::Float(x)),
        ("y", Value::Float(y)),
        ("wkb", Value::Bytes(wkb)),
        ("srid", Value::Null),
    ])
}

/// `io.debezium.data.geometry.Geometry` of a native type: `extensions` names the type and, for a
/// path, whether it is closed (which WKB cannot say).
fn geometry(wkb: Vec<u8>, native_type: &str, closed: Option<bool>) -> Value {
    let mut extensions = vec![("type", Value::String(native_type.to_owned()))];
    if let Some(closed) = closed {
        extensions.push(("closed", Value::String(closed.to_string())));
    }
    Value::Struct(vec![("wkb", Value::Bytes(wkb)), ("srid", Value::Null), ("extensions", Value::Struct(extensions))])
}

const WKB_POINT: u32 = 1;
const WKB_LINE_STRING: u32 = 2;
const WKB_POLYGON: u32 = 3;

/// Byte order (1: little-endian), then the geometry type.
fn wkb_header(out: &mut Vec<u8>, kind: u32) {
    out.push(1);
    out.extend_from_slice(&kind.to_le_bytes());
}

fn push_point(out: &mut Vec<u8>, (x, y): Point) {
    out.extend_from_slice(&x.to_le_bytes());
    out.extend_from_slice(&y.to_le_bytes());
}

/// A point count, then the points.
fn push_points(out: &mut Vec<u8>, points: &[Point]) {
    // A datum holds far fewer than 2^32 points (its size is limited to 1 GB).
    out.extend_from_slice(&(points.len() as u32).to_le_bytes());
    for p in points {
        push_point(out, *p);
    }
}

fn line_string(points: &[Point]) -> Vec<u8> {
    let mut wkb = Vec::with_capacity(9 + 16 * points.len());
    wkb_header(&mut wkb, WKB_LINE_STRING);
    push_points(&mut wkb, points);
    wkb
}

/// A polygon of one ring.
fn polygon(ring: &[Point]) -> Vec<u8> {
    let mut wkb = Vec::with_capacity(13 + 16 * ring.len());
    wkb_header(&mut wkb, WKB_POLYGON);
    wkb.extend_from_slice(&1u32.to_le_bytes());
    push_points(&mut wkb, ring);
    wkb
}

/// A float8 as its text output writes it (`1.5`, `-0`, `1e+300`, `NaN`, `-Infinity`).
fn number(text: &str) -> Option<f64> {
    text.parse().ok()
}

/// `(x,y)` at the start of `text`, and what follows it.
fn point_prefix(text: &str) -> Option<(Point, &str)> {
    let rest = text.strip_prefix('(')?;
    let end = rest.find(')')?;
    let (x, y) = rest[..end].split_once(',')?;
    Some(((number(x)?, number(y)?), &rest[end + 1..]))
}

/// `(x,y),(x,y)`.
fn two_points(text: &str) -> Option<(Point, Point)> {
    let (p, rest) = point_prefix(text)?;
    match point_prefix(rest.strip_prefix(',')?)? {
        (q, "") => Some((p, q)),
        _ => None,
    }
}

/// `(x,y),(x,y),...`: at least one point.
fn point_list(mut text: &str) -> Option<Vec<Point>> {
    let mut points = Vec::new();
    loop {
        let (p, rest) = point_prefix(text)?;
        points.push(p);
        match rest.strip_prefix(',') {
            Some(more) => text = more,
            None => return rest.is_empty().then_some(points),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(shape: Shape, text: &str) -> Value {
        shape.parse_text(text).unwrap_or_else(|| panic!("{text:?} did not parse as {shape:?}")).value()
    }

    /// Big-endian float8s, as the send functions write them.
    fn be(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    /// Little-endian WKB of the given type and body, as Debezium's writers build it.
    fn wkb(kind: u32, counts: &[u32], coords: &[f64]) -> Vec<u8> {
        let mut out = vec![1];
        out.extend_from_slice(&kind.to_le_bytes());
        for c in counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        for v in coords {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn extensions(pairs: &[(&'static str, &str)]) -> Value {
        Value::Struct(pairs.iter().map(|(k, v)| (*k, Value::String((*v).to_owned()))).collect())
    }

    fn geometry_of(wkb: Vec<u8>, ext: Value) -> Value {
        Value::Struct(vec![("wkb", Value::Bytes(wkb)), ("srid", Value::Null), ("extensions", ext)])
    }

    #[test]
    fn points_carry_coordinates_and_wkb() {
        let want = Value::Struct(vec![
            ("x", Value::Float(1.5)),
            ("y", Value::Float(2.5)),
            ("wkb", Value::Bytes(wkb(1, &[], &[1.5, 2.5]))),
            ("srid", Value::Null),
        ]);
        assert_eq!(text(Shape::Point, "(1.5,2.5)"), want);
        assert_eq!(Shape::Point.parse_binary(&be(&[1.5, 2.5])).map(|f| f.value()), Some(want));
        // The documented example: base64 of 01 01000000 then 1.5 and 2.5 as little-endian doubles.
        let Value::Struct(fields) = text(Shape::Point, "(1.5,2.5)") else { panic!() };
        let Value::Bytes(bytes) = &fields[2].1 else { panic!() };
        assert_eq!(bytes.len(), 21);
        assert_eq!(&bytes[..5], &[1, 1, 0, 0, 0]);
        // Every float8 text form.
        assert_eq!(Shape::Point.parse_text("(-0,1e+300)"), Some(Figure::Point((-0.0, 1e300))));
        assert_eq!(Shape::Point.parse_text("(1e-07,-Infinity)"), Some(Figure::Point((1e-7, f64::NEG_INFINITY))));
        assert!(matches!(Shape::Point.parse_text("(NaN,0)"), Some(Figure::Point((x, _))) if x.is_nan()));
        for bad in ["", "(1,2", "1,2)", "(1,2),", "(1;2)", "(1,2,3)", "(a,2)", "[(1,2)]"] {
            assert_eq!(Shape::Point.parse_text(bad), None, "{bad:?}");
        }
        assert_eq!(Shape::Point.parse_binary(&be(&[1.0])), None);
    }

    #[test]
    fn boxes_are_closed_rectangle_rings_from_the_first_corner() {
        // PostgreSQL writes the upper-right corner first.
        let want = geometry_of(
            wkb(3, &[1, 5], &[2.0, 3.0, 2.0, 0.0, -1.0, 0.0, -1.0, 3.0, 2.0, 3.0]),
            extensions(&[("type", "box")]),
        );
        assert_eq!(text(Shape::Box, "(2,3),(-1,0)"), want);
        assert_eq!(Shape::Box.parse_binary(&be(&[2.0, 3.0, -1.0, 0.0])).map(|f| f.value()), Some(want));
        assert_eq!(Shape::Box.parse_text("(2,3)"), None);
        assert_eq!(Shape::Box.parse_text("(2,3),(1,0),(0,0)"), None);
        assert_eq!(Shape::Box.parse_binary(&be(&[2.0, 3.0, -1.0])), None);
    }

    #[test]
    fn segments_and_paths_are_line_strings() {
        let lseg = geometry_of(wkb(2, &[2], &[0.0, 0.0, 1.5, -1.0]), extensions(&[("type", "lseg")]));
        assert_eq!(text(Shape::Lseg, "[(0,0),(1.5,-1)]"), lseg);
        assert_eq!(Shape::Lseg.parse_binary(&be(&[0.0, 0.0, 1.5, -1.0])).map(|f| f.value()), Some(lseg));
        assert_eq!(Shape::Lseg.parse_text("(0,0),(1.5,-1)"), None);

        let open = geometry_of(
            wkb(2, &[3], &[0.0, 0.0, 1.0, 1.0, 2.0, 0.0]),
            extensions(&[("type", "path"), ("closed", "false")]),
        );
        assert_eq!(text(Shape::Path, "[(0,0),(1,1),(2,0)]"), open);
        let mut raw = vec![0];
        raw.extend_from_slice(&3i32.to_be_bytes());
        raw.extend(be(&[0.0, 0.0, 1.0, 1.0, 2.0, 0.0]));
        assert_eq!(Shape::Path.parse_binary(&raw).map(|f| f.value()), Some(open));

        // A closed path stays a line string (Debezium does not repeat its first point); only the
        // flag tells it apart.
        let closed = geometry_of(
            wkb(2, &[3], &[0.0, 0.0, 1.0, 1.0, 2.0, 0.0]),
            extensions(&[("type", "path"), ("closed", "true")]),
        );
        assert_eq!(text(Shape::Path, "((0,0),(1,1),(2,0))"), closed);
        raw[0] = 1;
        assert_eq!(Shape::Path.parse_binary(&raw).map(|f| f.value()), Some(closed));

        let single = Shape::Path.parse_text("[(5,6)]");
        assert_eq!(single, Some(Figure::Path { closed: false, points: vec![(5.0, 6.0)] }));
        for bad in ["[(0,0),(1,1))", "((0,0),(1,1)]", "[]", "[(0,0),]", "(0,0),(1,1)"] {
            assert_eq!(Shape::Path.parse_text(bad), None, "{bad:?}");
        }
        raw.truncate(raw.len() - 1);
        assert_eq!(Shape::Path.parse_binary(&raw), None, "truncated");
        assert_eq!(Shape::Path.parse_binary(&[0, 0xFF, 0xFF, 0xFF, 0xFF]), None, "negative count");
    }

    #[test]
    fn polygons_are_closed_rings() {
        let want =
            geometry_of(wkb(3, &[1, 4], &[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), extensions(&[("type", "polygon")]));
        assert_eq!(text(Shape::Polygon, "((0,0),(1,0),(1,1))"), want);
        let mut raw = 3i32.to_be_bytes().to_vec();
        raw.extend(be(&[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]));
        assert_eq!(Shape::Polygon.parse_binary(&raw).map(|f| f.value()), Some(want));
        // Already closed: not closed twice; -0 equals 0 as Java compares doubles.
        let closed = text(Shape::Polygon, "((0,0),(1,0),(-0,0))");
        assert_eq!(
            closed,
            geometry_of(wkb(3, &[1, 3], &[0.0, 0.0, 1.0, 0.0, -0.0, 0.0]), extensions(&[("type", "polygon")]))
        );
        // One point: a ring of one point, as Debezium leaves it.
        assert_eq!(
            text(Shape::Polygon, "((7,8))"),
            geometry_of(wkb(3, &[1, 1], &[7.0, 8.0]), extensions(&[("type", "polygon")]))
        );
        assert_eq!(Shape::Polygon.parse_text("[(0,0),(1,0)]"), None);
    }

    #[test]
    fn circles_and_lines_keep_their_parameters() {
        let circle = Value::Struct(vec![
            (
                "center",
                Value::Struct(vec![
                    ("x", Value::Float(1.0)),
                    ("y", Value::Float(-2.0)),
                    ("wkb", Value::Bytes(wkb(1, &[], &[1.0, -2.0]))),
                    ("srid", Value::Null),
                ]),
            ),
            ("radius", Value::Float(3.5)),
        ]);
        assert_eq!(text(Shape::Circle, "<(1,-2),3.5>"), circle);
        assert_eq!(Shape::Circle.parse_binary(&be(&[1.0, -2.0, 3.5])).map(|f| f.value()), Some(circle));
        assert_eq!(Shape::Circle.parse_text("<(1,-2)>"), None);
        assert_eq!(Shape::Circle.parse_text("((1,-2),3.5)"), None);

        let line = Value::Struct(vec![("a", Value::Float(1.0)), ("b", Value::Float(-1.0)), ("c", Value::Float(0.5))]);
        assert_eq!(text(Shape::Line, "{1,-1,0.5}"), line);
        assert_eq!(Shape::Line.parse_binary(&be(&[1.0, -1.0, 0.5])).map(|f| f.value()), Some(line));
        assert_eq!(Shape::Line.parse_text("{1,-1}"), None);
        assert_eq!(Shape::Line.parse_text("{1,-1,0,2}"), None);
        assert_eq!(Shape::Line.parse_binary(&be(&[1.0, -1.0])), None);
    }

    #[test]
    fn oids() {
        assert_eq!(Shape::of(600), Some(Shape::Point));
        assert_eq!(Shape::of(718), Some(Shape::Circle));
        assert_eq!(Shape::of(1017), None, "point[] is not a shape");
    }
}
