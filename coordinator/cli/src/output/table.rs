//! [`Table`]: rows of cells printed in aligned columns under a header, the
//! way `kubectl get` and `docker ps` do.

/// Columns aligned to their widest cell; the last column is not padded.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    /// The header and rows, or `empty` when there are no rows.
    pub fn render_or(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return empty.to_string();
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        std::iter::once(&self.header)
            .chain(&self.rows)
            .map(|row| line(row, &widths))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn line(row: &[String], widths: &[usize]) -> String {
    let last = widths.len().saturating_sub(1);
    let cells = widths.iter().enumerate().map(|(i, w)| {
        let cell = row.get(i).map_or("", String::as_str);
        if i == last {
            cell.to_string()
        } else {
            format!("{cell:<w$}")
        }
    });
    cells.collect::<Vec<_>>().join("  ").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["ID", "STATE"]);
        t.row(vec!["7".into(), "running".into()]);
        t.row(vec!["1234".into(), "queued".into()]);
        assert_eq!(
            t.render_or("none"),
            "ID    STATE\n7     running\n1234  queued"
        );
        assert_eq!(Table::new(&["ID"]).render_or("none"), "none");
    }
}
