//! A small element tree over quick-xml: enough to read SOAP responses, whose shapes vary
//! with `xsi:type`, without a generated binding for all of vim25.

use quick_xml::events::Event;

/// One element: local name, attributes (qualified names), text, children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Node>,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub struct XmlError(pub String);

fn local(qname: &[u8]) -> String {
    let s = String::from_utf8_lossy(qname);
    match s.rsplit_once(':') {
        Some((_, l)) => l.to_string(),
        None => s.into_owned(),
    }
}

impl Node {
    /// Parses a document into its root element.
    pub fn parse(xml: &str) -> Result<Node, XmlError> {
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut stack: Vec<Node> = vec![Node::default()];
        loop {
            match reader.read_event() {
                Err(e) => return Err(XmlError(e.to_string())),
                Ok(Event::Eof) => break,
                Ok(Event::Start(e)) => stack.push(Self::open(&e)?),
                Ok(Event::Empty(e)) => {
                    let n = Self::open(&e)?;
                    if let Some(parent) = stack.last_mut() {
                        parent.children.push(n);
                    }
                }
                Ok(Event::End(_)) => {
                    let n = stack
                        .pop()
                        .ok_or_else(|| XmlError("unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(n),
                        None => return Err(XmlError("unbalanced end tag".into())),
                    }
                }
                Ok(Event::Text(t)) => {
                    let text = t.unescape().map_err(|e| XmlError(e.to_string()))?;
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&text);
                    }
                }
                Ok(Event::CData(t)) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&String::from_utf8_lossy(&t.into_inner()));
                    }
                }
                Ok(_) => {}
            }
        }
        let root = stack
            .pop()
            .ok_or_else(|| XmlError("empty document".into()))?;
        if !stack.is_empty() {
            return Err(XmlError("unclosed element".into()));
        }
        root.children
            .into_iter()
            .next()
            .ok_or_else(|| XmlError("no root element".into()))
    }

    fn open(e: &quick_xml::events::BytesStart<'_>) -> Result<Node, XmlError> {
        let mut attrs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| XmlError(e.to_string()))?;
            let v = a
                .unescape_value()
                .map_err(|e| XmlError(e.to_string()))?
                .into_owned();
            attrs.push((String::from_utf8_lossy(a.key.as_ref()).into_owned(), v));
        }
        Ok(Node {
            name: local(e.name().as_ref()),
            attrs,
            ..Default::default()
        })
    }

    pub fn attr(&self, qname: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == qname)
            .map(|(_, v)| v.as_str())
    }

    /// `xsi:type`, whatever the prefix.
    pub fn xsi_type(&self) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == "type" || k.ends_with(":type"))
            .filter(|(k, _)| k.contains(':'))
            .map(|(_, v)| v.rsplit(':').next().unwrap_or(v))
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The descendant at a `/`-separated path of child names.
    pub fn at(&self, path: &str) -> Option<&Node> {
        path.split('/').try_fold(self, |n, p| n.child(p))
    }

    /// The trimmed text at `path`.
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|n| n.text.trim())
    }
}

/// Escapes text for an element's content or an attribute.
pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_types_and_entities() {
        let n = Node::parse(
            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="x" xmlns:xsi="y"><soapenv:Body><R xmlns="urn:vim25"><returnval xsi:type="VirtualDisk"><key>2000</key><fileName>[ds] a &amp; b.vmdk</fileName><e/></returnval></R></soapenv:Body></soapenv:Envelope>"#,
        )
        .unwrap();
        assert_eq!(n.name, "Envelope");
        let r = n.at("Body/R/returnval").unwrap();
        assert_eq!(r.xsi_type(), Some("VirtualDisk"));
        assert_eq!(r.text_at("key"), Some("2000"));
        assert_eq!(r.text_at("fileName"), Some("[ds] a & b.vmdk"));
        assert!(r.child("e").is_some());
        assert!(Node::parse("<a><b></a>").is_err());
        assert!(Node::parse("").is_err());
    }
}
