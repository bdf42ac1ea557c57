// Package taskid names P2P tasks. A task is one blob: for a registry blob
// URL the ID is the blob's digest, so the same blob through any registry or
// mirror is one task; for any other URL it is the sha256 of the URL without
// its volatile query parameters (signatures, expiry), plus an optional tag.
package taskid

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// DefaultFilters are the query parameters that change between requests for
// the same object: S3, GCS and OSS signatures and expiry, and containerd's
// ns (the registry a mirror request is for). A trailing * matches a prefix.
var DefaultFilters = []string{
	"X-Amz-*", "AWSAccessKeyId", "Signature", "Expires",
	"X-Goog-*", "GoogleAccessId",
	"OSSAccessKeyId", "x-oss-*", "security-token",
	"ns",
}

var blobPath = regexp.MustCompile(`^/v2/(.+)/blobs/(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$`)

// RegistryDigest returns the digest a registry blob URL names, if it names one.
func RegistryDigest(u *url.URL) (string, bool) {
	m := blobPath.FindStringSubmatch(u.Path)
	if m == nil {
		return "", false
	}
	return m[2], true
}

// ForURL returns the task ID of rawURL.
func ForURL(rawURL, tag string, filters []string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("task ID of %q: %w", rawURL, err)
	}
	if d, ok := RegistryDigest(u); ok {
		return d, nil
	}
	if u.Scheme == "" || u.Host == "" {
		return "", fmt.Errorf("task ID of %q: not an absolute URL", rawURL)
	}
	q := u.Query()
	for k := range q {
		if filtered(k, filters) {
			q.Del(k)
		}
	}
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host) + u.EscapedPath())
	for i, k := range keys {
		sep := "&"
		if i == 0 {
			sep = "?"
		}
		vs := q[k]
		sort.Strings(vs)
		for _, v := range vs {
			b.WriteString(sep + url.QueryEscape(k) + "=" + url.QueryEscape(v))
			sep = "&"
		}
	}
	if tag != "" {
		b.WriteString("\x00" + tag)
	}
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:]), nil
}

func filtered(key string, filters []string) bool {
	for _, f := range filters {
		if p, ok := strings.CutSuffix(f, "*"); ok {
			if strings.HasPrefix(strings.ToLower(key), strings.ToLower(p)) {
				return true
			}
		} else if strings.EqualFold(key, f) {
			return true
		}
	}
	return false
}

// ForRegistryBlob is the task ID of a registry blob URL: the blob's
// digest and the registry host it comes from. The proxy, preheat and the
// lazy snapshotter use it, so that what one of them fetched the others
// find. Pieces are checked against the digests the
// peer that fetched them from the origin computed, and only the whole
// blob against its digest; were one digest one task across registries,
// a client naming another upstream (a registry that serves other bytes
// under that digest) would fill the task that ranged reads of everyone
// else are served from before any whole-blob check. Tasks of one host do
// mix across repositories: a registry serves a digest's bytes, whatever
// the repository. ok is false for a URL that names no blob.
func ForRegistryBlob(u *url.URL) (string, bool) {
	d, ok := RegistryDigest(u)
	if !ok {
		return "", false
	}
	sum := sha256.Sum256([]byte("registry-blob\x00" + CanonicalHost(u) + "\x00" + d))
	return hex.EncodeToString(sum[:]), true
}

// dockerAliases are the names of Docker Hub's registry.
var dockerAliases = []string{"docker.io", "index.docker.io", "registry-1.docker.io"}

// CanonicalHost is a registry's host as task IDs and access checks name
// it: lower case, without a default port, Docker Hub's names as one.
func CanonicalHost(u *url.URL) string {
	host, port := strings.ToLower(u.Hostname()), u.Port()
	host = strings.TrimSuffix(host, ".")
	if port == "443" || port == "80" {
		port = ""
	}
	if slices.Contains(dockerAliases, host) && port == "" {
		return "docker.io"
	}
	if port == "" {
		if strings.Contains(host, ":") {
			return "[" + host + "]"
		}
		return host
	}
	return net.JoinHostPort(host, port)
}
