//! Host hygiene for instances that live long (in-place updates): which local images of the
//! app's repository can go once a release is healthy. Pure: the Docker side is in `docker`.
//!
//! Kept: images the current or the previous release names (by tag or digest), images any
//! container uses (running or stopped: the rollback target), and images that also carry a
//! reference outside the app's repository (someone else's).

use skiff_release::{ImageRef, Release};

/// A local image as the engine lists it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalImageInfo {
    pub id: String,
    /// `repo:tag` references.
    pub tags: Vec<String>,
    /// `repo@sha256:...` references.
    pub digests: Vec<String>,
}

/// The references to remove (an image goes with its last reference), in the order to remove
/// them: per image, tags first.
pub fn images_to_prune(
    repository: &str,
    images: &[LocalImageInfo],
    keep: &[&Release],
    in_use: &[String],
) -> Vec<String> {
    let Ok(app) = repository.parse::<ImageRef>() else {
        return Vec::new();
    };
    let mut remove = Vec::new();
    for image in images {
        // Docker lists untagged images as `<none>:<none>` / `<none>@<none>`.
        let refs: Vec<&String> = image
            .tags
            .iter()
            .chain(&image.digests)
            .filter(|r| !r.starts_with("<none>"))
            .collect();
        if refs.is_empty() || in_use.contains(&image.id) {
            continue;
        }
        // A reference that does not parse is not known to be the app's: the image stays.
        let Some(parsed) = refs
            .iter()
            .map(|r| r.parse::<ImageRef>().ok())
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        if parsed.iter().any(|r| !r.same_repository(&app)) {
            continue;
        }
        let named_by_keep = keep.iter().any(|k| {
            parsed.iter().any(|r| {
                r.tag() == Some(&k.tag) || (k.digest.is_some() && r.digest() == k.digest.as_ref())
            })
        });
        if named_by_keep {
            continue;
        }
        remove.extend(refs.into_iter().cloned());
    }
    remove
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const REPO: &str = "127.0.0.1:5000/team/app";

    fn image(id: &str, tags: &[&str], digests: &[&str]) -> LocalImageInfo {
        LocalImageInfo {
            id: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn release(tag: &str, digest: Option<&str>) -> Release {
        Release::new(
            tag.parse().expect("tag"),
            digest.map(|d| d.parse().expect("digest")),
        )
    }

    #[test]
    fn which_images_go() {
        let r = |s: &str| format!("{REPO}{s}");
        let v3 = release("v3", None);
        let v2 = release("v2", Some(D2));
        struct Case {
            what: &'static str,
            images: Vec<LocalImageInfo>,
            in_use: Vec<&'static str>,
            want: Vec<String>,
        }
        let cases = [
            Case {
                what: "older releases go, current and previous stay",
                images: vec![
                    image("i1", &[&r(":v1")], &[&r(&format!("@{D1}"))]),
                    image("i2", &[&r(":v2")], &[]),
                    image("i3", &[&r(":v3")], &[]),
                    image("i4", &[&r(":v4")], &[]),
                ],
                in_use: vec![],
                want: vec![r(":v1"), r(&format!("@{D1}")), r(":v4")],
            },
            Case {
                what: "the previous release pinned by digest only, untagged",
                images: vec![
                    image("i2", &["<none>:<none>"], &[&r(&format!("@{D2}"))]),
                    image("i1", &["<none>:<none>"], &[&r(&format!("@{D1}"))]),
                ],
                in_use: vec![],
                want: vec![r(&format!("@{D1}"))],
            },
            Case {
                what: "an image a container uses stays",
                images: vec![image("i1", &[&r(":v1")], &[])],
                in_use: vec!["i1"],
                want: vec![],
            },
            Case {
                what: "other repositories are never touched",
                images: vec![
                    image("o1", &["127.0.0.1:5000/team/other:v1"], &[]),
                    image("o2", &["127.0.0.1:5000/team/app-old:v1"], &[]),
                    image("o3", &["team/app:v1"], &[]),
                    image("o4", &["<none>:<none>"], &["<none>@<none>"]),
                ],
                in_use: vec![],
                want: vec![],
            },
            Case {
                what: "an image also tagged in another repository stays",
                images: vec![image("i1", &[&r(":v1"), "mirror/app:v1"], &[])],
                in_use: vec![],
                want: vec![],
            },
            Case {
                what: "an image under several tags of ours goes with all of them",
                images: vec![image("i1", &[&r(":v1"), &r(":main")], &[])],
                in_use: vec![],
                want: vec![r(":v1"), r(":main")],
            },
            Case {
                what: "a kept tag keeps its image whatever other tags it has",
                images: vec![image("i3", &[&r(":main"), &r(":v3")], &[])],
                in_use: vec![],
                want: vec![],
            },
        ];
        for c in cases {
            let in_use: Vec<String> = c.in_use.iter().map(|s| s.to_string()).collect();
            let got = images_to_prune(REPO, &c.images, &[&v3, &v2], &in_use);
            assert_eq!(got, c.want, "{}", c.what);
        }
    }

    #[test]
    fn docker_hub_names_are_compared_normalised() {
        let images = [
            image("p1", &["python:3.11"], &[]),
            image("a1", &["team/app:v1"], &[]),
        ];
        let keep = release("v9", None);
        assert_eq!(
            images_to_prune("docker.io/library/python", &images, &[&keep], &[]),
            vec!["python:3.11".to_owned()]
        );
        assert_eq!(
            images_to_prune("docker.io/team/app", &images, &[&keep], &[]),
            vec!["team/app:v1".to_owned()]
        );
    }

    /// Docker Hub spellings are one repository; a reference that does not parse keeps its image.
    #[test]
    fn hub_spellings_and_unreadable_references() {
        let images = [
            image("a", &["team/app:v1"], &[]),
            image("b", &["index.docker.io/team/app:v2"], &[]),
            image("c", &["team/app:v3", "Not A Reference"], &[]),
            image("d", &["nginx:1"], &[]),
        ];
        let keep = Release::new("v9".parse().expect("tag"), None);
        assert_eq!(
            images_to_prune("docker.io/team/app", &images, &[&keep], &[]),
            vec![
                "team/app:v1".to_owned(),
                "index.docker.io/team/app:v2".to_owned()
            ]
        );
        assert_eq!(
            images_to_prune("docker.io/library/nginx", &images, &[&keep], &[]),
            vec!["nginx:1".to_owned()]
        );
    }
}
