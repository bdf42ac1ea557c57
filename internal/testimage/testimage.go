// Package testimage builds the images starling's tests run against, in Go,
// deterministically: a "hard cases" image whose layers hold everything a
// layer format and a snapshotter get wrong, and large images of random data.
package testimage

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Epoch is the modification time of every entry, so builds are reproducible.
var Epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Entry is one tar entry of a layer.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg, TypeDir, TypeSymlink, TypeLink, TypeChar, TypeBlock, TypeFifo
	Mode     int64
	UID, GID int
	Data     []byte
	Link     string
	Major    int64
	Minor    int64
	Xattrs   map[string]string
	// ModTime is the entry's mtime; zero means Epoch. eStargz TOCs keep
	// whole seconds only (rounded), so tests use whole seconds.
	ModTime time.Time
}

// Layer is a list of entries written in order. A hardlink entry carries the
// mode and owner of its target, as tar(1) writes them: unpackers apply a
// hardlink header's metadata to the shared inode.
type Layer []Entry

// Tar writes the layer as an uncompressed tar.
func (l Layer) Tar() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range l {
		h := &tar.Header{
			Name:     e.Name,
			Typeflag: e.Type,
			Mode:     e.Mode,
			Uid:      e.UID,
			Gid:      e.GID,
			Linkname: e.Link,
			Devmajor: e.Major,
			Devminor: e.Minor,
			ModTime:  Epoch,
			Format:   tar.FormatPAX,
		}
		if !e.ModTime.IsZero() {
			h.ModTime = e.ModTime
		}
		if e.Type == tar.TypeReg {
			h.Size = int64(len(e.Data))
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if e.Type == tar.TypeReg {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Image assembles layers into an OCI image for this host's architecture,
// with gzip layers, running /bin/sh by default.
func Image(layers ...Layer) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		b, err := l.Tar()
		if err != nil {
			return nil, err
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(b)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, err
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: "testimage"}}); err != nil {
			return nil, err
		}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: Epoch}
	cfg.Config.Cmd = []string{"/bin/sh"}
	cfg.Config.Env = []string{"PATH=/bin"}
	return mutate.ConfigFile(img, cfg)
}

// Random returns n bytes of deterministic pseudo-random data.
func Random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := n - n%8; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// BusyboxLayer holds the host's static busybox as /bin/busybox with /bin/sh
// and a few applets linked to it, so that containers can run from the image.
func BusyboxLayer() (Layer, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return nil, err
	}
	l := Layer{
		{Name: "bin/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Type: tar.TypeReg, Mode: 0o755, Data: bb},
	}
	for _, app := range []string{"sh", "cat", "ls", "sha256sum", "echo", "head", "wc", "sleep", "find", "stat"} {
		l = append(l, Entry{Name: "bin/" + app, Type: tar.TypeSymlink, Mode: 0o777, Link: "busybox"})
	}
	return l, nil
}

// capability is a VFS_CAP_REVISION_2 security.capability value granting
// CAP_NET_BIND_SERVICE, effective.
func capability() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|0x1)
	binary.LittleEndian.PutUint32(b[4:], 1<<10)
	return string(b)
}

// hardLayers returns the layers of the hard-case image: three over busybox
// holding hardlinks across directories (also to a setuid file and a fifo),
// symlinks of every kind, empty, sparse-looking and multi-chunk files,
// whiteouts, opaque directories and type changes across layers, devices and
// fifos, a spread of the 4096 permission/setuid/setgid/sticky combinations
// on files and directories, owners up to 4294967294, per-entry mtimes (whole
// seconds, also before 1970 and after 2038), xattrs including
// security.capability, user.* and trusted.*, names with spaces, newlines and
// 255 bytes, and a path near PATH_MAX. Every directory is an explicit entry
// of each layer that holds something in it, so no time comes from the unpacking.
func hardLayers() ([]Layer, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return nil, err
	}
	long := strings.Repeat("L", 250) + ".long"
	deep := ""
	for i := 0; i < 40; i++ {
		deep += "d" + string(rune('a'+i%26)) + "/"
	}
	base := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/hostname", Type: tar.TypeReg, Mode: 0o644, Data: []byte("lower\n")},
		{Name: "data/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/a/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/b/", Type: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000},
		{Name: "data/a/hl1", Type: tar.TypeReg, Mode: 0o640, UID: 1000, GID: 100, Data: []byte("linked content\n")},
		{Name: "data/b/hl2", Type: tar.TypeLink, Mode: 0o640, UID: 1000, GID: 100, Link: "data/a/hl1"},
		{Name: "hlroot", Type: tar.TypeLink, Mode: 0o640, UID: 1000, GID: 100, Link: "data/a/hl1"},
		{Name: "data/empty", Type: tar.TypeReg, Mode: 0o644},
		{Name: "data/big", Type: tar.TypeReg, Mode: 0o644, Data: Random(1, 5<<20+123)},
		{Name: "data/medium1", Type: tar.TypeReg, Mode: 0o600, Data: Random(2, 300_000)},
		{Name: "data/medium2", Type: tar.TypeReg, Mode: 0o444, Data: bytes.Repeat([]byte("compressible "), 40_000)},
		{Name: "data/rel", Type: tar.TypeSymlink, Mode: 0o777, Link: "../etc/hostname"},
		{Name: "data/abs", Type: tar.TypeSymlink, Mode: 0o777, Link: "/etc/hostname"},
		{Name: "data/dangling", Type: tar.TypeSymlink, Mode: 0o777, Link: "/does/not/exist"},
		{Name: "data/dirlink", Type: tar.TypeSymlink, Mode: 0o777, Link: "a"},
		{Name: "data/owned", Type: tar.TypeReg, Mode: 0o644, UID: 1000, GID: 1000, Data: []byte("owned by 1000\n")},
		{Name: "data/nobody", Type: tar.TypeReg, Mode: 0o600, UID: 65534, GID: 65534, Data: []byte("nobody\n")},
		{Name: "data/xattr", Type: tar.TypeReg, Mode: 0o644, Data: []byte("has xattrs\n"), Xattrs: map[string]string{"user.starling": "yes", "user.empty": ""}},
		{Name: "data/" + long, Type: tar.TypeReg, Mode: 0o644, Data: []byte("long name\n")},
		{Name: "data/remove-me", Type: tar.TypeReg, Mode: 0o644, Data: []byte("to be whited out\n")},
		{Name: "data/remove-dir/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/remove-dir/inside", Type: tar.TypeReg, Mode: 0o644, Data: []byte("gone\n")},
		{Name: "bin/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/cap", Type: tar.TypeReg, Mode: 0o755, Data: []byte("#!/bin/sh\necho cap\n"), Xattrs: map[string]string{"security.capability": capability()}},
		{Name: "bin/suid", Type: tar.TypeReg, Mode: 0o4755, Data: []byte("setuid\n")},
		{Name: "bin/sgid", Type: tar.TypeReg, Mode: 0o2755, UID: 0, GID: 50, Data: []byte("setgid\n")},
		{Name: "sgid-dir/", Type: tar.TypeDir, Mode: 0o2775, GID: 50},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "dev/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "dev/mychr", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		{Name: "dev/myblk", Type: tar.TypeBlock, Mode: 0o660, GID: 6, Major: 7, Minor: 0},
		{Name: "dev/myfifo", Type: tar.TypeFifo, Mode: 0o644},
		{Name: "opaque/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "opaque/old", Type: tar.TypeReg, Mode: 0o644, Data: []byte("hidden by the opaque upper\n")},
		{Name: "opaque/olddir/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "opaque/olddir/f", Type: tar.TypeReg, Mode: 0o644, Data: []byte("hidden too\n")},
		{Name: "café/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "café/日本語.txt", Type: tar.TypeReg, Mode: 0o644, Data: []byte("こんにちは\n")},
		{Name: "café/ünïcödé-ñame", Type: tar.TypeSymlink, Mode: 0o777, Link: "日本語.txt"},
	}
	dir := ""
	for _, part := range strings.Split(strings.TrimSuffix(deep, "/"), "/") {
		dir += part + "/"
		base = append(base, Entry{Name: dir, Type: tar.TypeDir, Mode: 0o755})
	}
	base = append(base, Entry{Name: dir + "bottom", Type: tar.TypeReg, Mode: 0o644, Data: []byte("deep\n")})

	upper := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/hostname", Type: tar.TypeReg, Mode: 0o644, Data: []byte("upper\n")},
		{Name: "data/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/.wh.remove-me", Type: tar.TypeReg, Mode: 0o644},
		{Name: "data/.wh.remove-dir", Type: tar.TypeReg, Mode: 0o644},
		{Name: "opaque/", Type: tar.TypeDir, Mode: 0o711},
		{Name: "opaque/.wh..wh..opq", Type: tar.TypeReg, Mode: 0o644},
		{Name: "opaque/new", Type: tar.TypeReg, Mode: 0o644, Data: []byte("the only file left\n")},
		{Name: "café/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "café/upper-ß", Type: tar.TypeReg, Mode: 0o644, UID: 42, GID: 42, Data: []byte("upper layer\n")},
		{Name: "data/upper-hl/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/upper-hl/one", Type: tar.TypeReg, Mode: 0o644, Data: Random(3, 70_000)},
		{Name: "data/upper-hl/two", Type: tar.TypeLink, Mode: 0o644, Link: "data/upper-hl/one"},
	}
	top := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/layer3", Type: tar.TypeReg, Mode: 0o644, Data: []byte("third\n")},
		{Name: "private/", Type: tar.TypeDir, Mode: 0o700, UID: 1000, GID: 1000},
		{Name: "private/secret", Type: tar.TypeReg, Mode: 0o400, UID: 1000, GID: 1000, Data: []byte("s3cret\n")},
	}
	mb, mu := metadataCases()
	return []Layer{bb, append(base, mb...), append(upper, mu...), top}, nil
}

// acl is a system.posix_acl_* value: owner, one named user, group, mask
// and other entries, as the kernel's xattr form of an ACL (version 2).
func acl(owner uint16, user uint32, userPerm, group, other uint16) string {
	const undefined = 0xffffffff
	b := binary.LittleEndian.AppendUint32(nil, 2)
	entry := func(tag, perm uint16, id uint32) {
		b = binary.LittleEndian.AppendUint16(b, tag)
		b = binary.LittleEndian.AppendUint16(b, perm)
		b = binary.LittleEndian.AppendUint32(b, id)
	}
	entry(0x01, owner, undefined)
	entry(0x02, userPerm, user)
	entry(0x04, group, undefined)
	entry(0x10, userPerm|group, undefined)
	entry(0x20, other, undefined)
	return string(b)
}

// HardCases returns the hard-case image: busybox and three layers, every
// entry of which an eStargz or zstd:chunked TOC can represent exactly.
func HardCases() (v1.Image, error) {
	layers, err := hardLayers()
	if err != nil {
		return nil, err
	}
	return Image(layers...)
}

// HardCasesWithNonUTF8 is HardCases with a fifth layer, NonUTF8Layer, whose
// names a TOC cannot represent: converters must leave that layer as it is.
func HardCasesWithNonUTF8() (v1.Image, error) {
	layers, err := hardLayers()
	if err != nil {
		return nil, err
	}
	return Image(append(layers, NonUTF8Layer())...)
}

// NonUTF8Layer holds names and a symlink target that are not UTF-8. A TOC is
// JSON, which cannot hold such bytes (encoding/json turns them into U+FFFD).
func NonUTF8Layer() Layer {
	return Layer{
		{Name: "nonutf8/", Type: tar.TypeDir, Mode: 0o755, ModTime: at(1)},
		{Name: "nonutf8/latin1-caf\xe9", Type: tar.TypeReg, Mode: 0o644, Data: []byte("latin-1\n"), ModTime: at(2)},
		{Name: "nonutf8/bad-\xff\xfe-bytes", Type: tar.TypeReg, Mode: 0o600, UID: 100000, Data: []byte("invalid utf-8\n"), ModTime: at(3)},
		{Name: "nonutf8/dir-\x80/", Type: tar.TypeDir, Mode: 0o750, ModTime: at(4)},
		{Name: "nonutf8/dir-\x80/inside", Type: tar.TypeReg, Mode: 0o644, Data: []byte("in a non-UTF-8 dir\n"), ModTime: at(5)},
		{Name: "nonutf8/link-to-bad", Type: tar.TypeSymlink, Mode: 0o777, Link: "bad-\xff\xfe-bytes", ModTime: at(6)},
		{Name: "nonutf8/ok", Type: tar.TypeReg, Mode: 0o644, Data: []byte("plain\n"), ModTime: at(7)},
	}
}

// at is Epoch plus n hours and n seconds: distinct whole-second mtimes.
func at(n int) time.Time { return Epoch.Add(time.Duration(n) * (time.Hour + time.Second)) }

// Modes is the spread of permission, setuid, setgid and sticky bits the
// hard-case image holds on files and on directories: the usual and the
// odd ones, and every 37th of the 4096.
func Modes() []int64 {
	ms := []int64{0o0000, 0o4755, 0o2755, 0o1777, 0o0400, 0o0111, 0o0777, 0o6755, 0o7777, 0o0644, 0o0700,
		0o4000, 0o2000, 0o1000, 0o0001, 0o0070, 0o3777, 0o5555}
	for m := int64(0); m <= 0o7777; m += 37 {
		ms = append(ms, m)
	}
	return ms
}

// owners are uids and gids beyond the old 16-bit limit among the usual ones;
// 4294967295 is left out, as chown(2) reads it as "unchanged".
var owners = []int{0, 1, 999, 65534, 65535, 65536, 100000, 1 << 31, 4294967294}

// PathMaxDepth and PathMaxName shape the deepest path of the image: under
// pathmax/, PathMaxDepth directories of 200-byte names and a PathMaxName-byte
// file, about 3,950 bytes in all, so that with the directory it is unpacked
// in the whole path stays under PATH_MAX (4096).
const (
	PathMaxDepth = 19
	PathMaxName  = 130
)

// metadataCases returns entries for the base layer and the layer over it
// that cover every kind of metadata a lazy mount must show exactly as an
// unpacked layer does.
func metadataCases() (base, upper Layer) {
	add := func(l *Layer, e Entry) { *l = append(*l, e) }
	n := 0
	next := func() time.Time { n++; return at(10 + n) }

	// Every mode of the spread on a file and on a directory (with a file in
	// it), with owners and mtimes that vary with it.
	add(&base, Entry{Name: "modes/", Type: tar.TypeDir, Mode: 0o755, ModTime: at(9)})
	for i, m := range Modes() {
		uid, gid := owners[i%len(owners)], owners[(i*5+3)%len(owners)]
		add(&base, Entry{Name: fmt.Sprintf("modes/f%02d-%04o", i, m), Type: tar.TypeReg, Mode: m, UID: uid, GID: gid,
			Data: []byte(fmt.Sprintf("mode %04o\n", m)), ModTime: next()})
		d := fmt.Sprintf("modes/d%02d-%04o/", i, m)
		add(&base, Entry{Name: d, Type: tar.TypeDir, Mode: m, UID: gid, GID: uid, ModTime: next()})
		add(&base, Entry{Name: d + "f", Type: tar.TypeReg, Mode: 0o644, Data: []byte("in " + d + "\n"), ModTime: next()})
	}

	// Owners above 65535 on every type.
	add(&base, Entry{Name: "owners/", Type: tar.TypeDir, Mode: 0o755, UID: 100000, GID: 100000, ModTime: next()})
	for i, o := range owners {
		add(&base, Entry{Name: fmt.Sprintf("owners/file-%d", o), Type: tar.TypeReg, Mode: 0o640, UID: o, GID: owners[len(owners)-1-i], Data: []byte("owned\n"), ModTime: next()})
	}
	add(&base, Entry{Name: "owners/dir-4294967294/", Type: tar.TypeDir, Mode: 0o700, UID: 4294967294, GID: 4294967294, ModTime: next()})
	add(&base, Entry{Name: "owners/link-100000", Type: tar.TypeSymlink, Mode: 0o777, UID: 100000, GID: 200000, Link: "file-100000", ModTime: next()})
	add(&base, Entry{Name: "owners/fifo-100000", Type: tar.TypeFifo, Mode: 0o600, UID: 100000, GID: 100000, ModTime: next()})
	add(&base, Entry{Name: "owners/chr-65536", Type: tar.TypeChar, Mode: 0o620, UID: 65536, GID: 5, Major: 4, Minor: 64, ModTime: next()})

	// mtimes: the epoch itself (eStargz writes no time for it), before it
	// (containerd's unpack clamps those to the epoch), just past 2^31
	// seconds, and far ahead; on files, directories and symlinks.
	add(&base, Entry{Name: "times/", Type: tar.TypeDir, Mode: 0o755, ModTime: time.Date(2001, 9, 9, 1, 46, 40, 0, time.UTC)})
	for _, tc := range []struct {
		name string
		t    time.Time
	}{
		{"unix0", time.Unix(0, 0)},
		{"unix1", time.Unix(1, 0)},
		{"before1970", time.Date(1960, 6, 15, 12, 0, 0, 0, time.UTC)},
		{"minus1", time.Unix(-1, 0)},
		{"y2038", time.Unix(1<<31, 0)},
		{"y2100", time.Date(2100, 2, 28, 23, 59, 59, 0, time.UTC)},
	} {
		add(&base, Entry{Name: "times/file-" + tc.name, Type: tar.TypeReg, Mode: 0o644, Data: []byte(tc.name + "\n"), ModTime: tc.t})
		add(&base, Entry{Name: "times/dir-" + tc.name + "/", Type: tar.TypeDir, Mode: 0o755, ModTime: tc.t})
		add(&base, Entry{Name: "times/link-" + tc.name, Type: tar.TypeSymlink, Mode: 0o777, Link: "file-" + tc.name, ModTime: tc.t})
	}

	// xattrs: capabilities, user.* (binary, empty, long, many), trusted.*
	// on a file, a directory and a symlink.
	bin := string([]byte{0, 1, 2, 0xff, 0xfe, 0x80, 0, '\n'})
	many := map[string]string{}
	for i := 0; i < 12; i++ {
		many[fmt.Sprintf("user.k%02d", i)] = strings.Repeat(string(rune('a'+i)), i*7)
	}
	add(&base, Entry{Name: "xattrs/", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.dir": "on a directory", "trusted.dir": "t"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/cap", Type: tar.TypeReg, Mode: 0o755, Data: []byte("#!/bin/sh\n"), Xattrs: map[string]string{"security.capability": capability()}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/cap-and-user", Type: tar.TypeReg, Mode: 0o750, GID: 100000, Data: []byte("#!/bin/sh\n"),
		Xattrs: map[string]string{"security.capability": capability(), "user.note": "both"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/binary", Type: tar.TypeReg, Mode: 0o644, Data: []byte("b\n"), Xattrs: map[string]string{"user.bin": bin, "user.empty": ""}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/long", Type: tar.TypeReg, Mode: 0o644, Data: []byte("l\n"), Xattrs: map[string]string{"user.long": string(Random(7, 1000))}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/many", Type: tar.TypeReg, Mode: 0o644, Data: []byte("m\n"), Xattrs: many, ModTime: next()})
	add(&base, Entry{Name: "xattrs/trusted", Type: tar.TypeReg, Mode: 0o644, Data: []byte("t\n"), Xattrs: map[string]string{"trusted.starling": "t", "user.starling": "u"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/empty-file", Type: tar.TypeReg, Mode: 0o000, Xattrs: map[string]string{"user.on-empty": "e"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/symlink", Type: tar.TypeSymlink, Mode: 0o777, Link: "trusted", Xattrs: map[string]string{"trusted.link": "l"}, ModTime: next()})
	// containerd never applies trusted.* from a layer, and the kernel takes
	// user.* only on files and directories: these must not show either.
	add(&base, Entry{Name: "xattrs/trusted-kept", Type: tar.TypeReg, Mode: 0o644, Data: []byte("t\n"), Xattrs: map[string]string{"trusted.starling": "t", "user.kept": "u"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/trusted-dir/", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"trusted.dir": "t"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/user-symlink", Type: tar.TypeSymlink, Mode: 0o777, Link: "binary", Xattrs: map[string]string{"user.on-link": "l"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/user-fifo", Type: tar.TypeFifo, Mode: 0o644, Xattrs: map[string]string{"user.on-fifo": "f"}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/security-other", Type: tar.TypeReg, Mode: 0o644, Data: []byte("s\n"), Xattrs: map[string]string{"security.starling": "s"}, ModTime: next()})
	// POSIX ACLs travel as system.posix_acl_* xattrs.
	add(&base, Entry{Name: "xattrs/acl-file", Type: tar.TypeReg, Mode: 0o640, Data: []byte("acl\n"), Xattrs: map[string]string{"system.posix_acl_access": acl(0o6, 1000, 0o4, 0o4, 0)}, ModTime: next()})
	add(&base, Entry{Name: "xattrs/acl-dir/", Type: tar.TypeDir, Mode: 0o750, Xattrs: map[string]string{"system.posix_acl_access": acl(0o7, 1000, 0o5, 0o5, 0),
		"system.posix_acl_default": acl(0o7, 1000, 0o7, 0o5, 0)}, ModTime: next()})

	// Devices and fifos, with minors above 255 and the largest numbers Linux has.
	add(&base, Entry{Name: "devs/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "devs/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3, ModTime: next()})
	add(&base, Entry{Name: "devs/big-minor", Type: tar.TypeChar, Mode: 0o600, Major: 254, Minor: 70000, ModTime: next()})
	add(&base, Entry{Name: "devs/max", Type: tar.TypeBlock, Mode: 0o660, GID: 6, Major: 4095, Minor: 1048575, ModTime: next()})
	add(&base, Entry{Name: "devs/loop0", Type: tar.TypeBlock, Mode: 0o4660, Major: 7, Minor: 0, ModTime: next()})
	add(&base, Entry{Name: "devs/fifo", Type: tar.TypeFifo, Mode: 0o620, ModTime: next()})
	add(&base, Entry{Name: "devs/fifo-sticky", Type: tar.TypeFifo, Mode: 0o1666, ModTime: next()})

	// Hard links across directories, to a setuid file, to a file with a
	// capability, to an empty 0000 file and to a fifo; one name of a group
	// is whited out in the layer above.
	suidT, capT, zeroT, fifoT, groupT := next(), next(), next(), next(), next()
	add(&base, Entry{Name: "links/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "links/a/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "links/b/", Type: tar.TypeDir, Mode: 0o711, ModTime: next()})
	add(&base, Entry{Name: "links/a/suid", Type: tar.TypeReg, Mode: 0o4755, UID: 100000, GID: 0, Data: []byte("setuid target\n"), ModTime: suidT})
	add(&base, Entry{Name: "links/b/suid-link", Type: tar.TypeLink, Mode: 0o4755, UID: 100000, GID: 0, Link: "links/a/suid", ModTime: suidT})
	add(&base, Entry{Name: "links/a/cap", Type: tar.TypeReg, Mode: 0o755, Data: []byte("cap target\n"), Xattrs: map[string]string{"security.capability": capability()}, ModTime: capT})
	add(&base, Entry{Name: "links/b/cap-link", Type: tar.TypeLink, Mode: 0o755, Link: "links/a/cap", Xattrs: map[string]string{"security.capability": capability()}, ModTime: capT})
	add(&base, Entry{Name: "links/a/zero", Type: tar.TypeReg, Mode: 0o000, UID: 4294967294, ModTime: zeroT})
	add(&base, Entry{Name: "links/b/zero-link", Type: tar.TypeLink, Mode: 0o000, UID: 4294967294, Link: "links/a/zero", ModTime: zeroT})
	add(&base, Entry{Name: "links/zero-link2", Type: tar.TypeLink, Mode: 0o000, UID: 4294967294, Link: "links/a/zero", ModTime: zeroT})
	add(&base, Entry{Name: "links/a/fifo", Type: tar.TypeFifo, Mode: 0o640, ModTime: fifoT})
	add(&base, Entry{Name: "links/b/fifo-link", Type: tar.TypeLink, Mode: 0o640, Link: "links/a/fifo", ModTime: fifoT})
	add(&base, Entry{Name: "links/a/group", Type: tar.TypeReg, Mode: 0o644, Data: []byte("three names, one whited out\n"), ModTime: groupT})
	add(&base, Entry{Name: "links/b/group2", Type: tar.TypeLink, Mode: 0o644, Link: "links/a/group", ModTime: groupT})
	add(&base, Entry{Name: "links/group3", Type: tar.TypeLink, Mode: 0o644, Link: "links/a/group", ModTime: groupT})

	// Empty, sparse-looking (tar and eStargz store holes as zeros) and
	// large multi-chunk files.
	sparse := make([]byte, 24<<20)
	copy(sparse, "start")
	copy(sparse[12<<20:], "middle")
	copy(sparse[len(sparse)-4:], "end\n")
	add(&base, Entry{Name: "sizes/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "sizes/empty", Type: tar.TypeReg, Mode: 0o600, ModTime: next()})
	add(&base, Entry{Name: "sizes/empty-suid", Type: tar.TypeReg, Mode: 0o4711, ModTime: next()})
	add(&base, Entry{Name: "sizes/sparse", Type: tar.TypeReg, Mode: 0o644, Data: sparse, ModTime: next()})
	add(&base, Entry{Name: "sizes/large", Type: tar.TypeReg, Mode: 0o644, Data: Random(20, 20<<20+4097), ModTime: next()})
	add(&base, Entry{Name: "sizes/one-byte", Type: tar.TypeReg, Mode: 0o644, Data: []byte{0}, ModTime: next()})

	// Names: spaces, newlines, control and shell characters, 255 bytes of
	// ASCII and of multi-byte UTF-8.
	add(&base, Entry{Name: "names/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	for _, nm := range []string{"with space", " leading", "trailing ", "new\nline", "tab\there", "cr\rhere", "back\\slash",
		"quote\"d", "it's", "-dash", ".hidden", "..dots", "a:b", "50%", "*?[glob]", "$HOME", "é-nfc", "e\u0301-nfd", "🐦 bird",
		strings.Repeat("n", 255), strings.Repeat("日", 85)} {
		add(&base, Entry{Name: "names/" + nm, Type: tar.TypeReg, Mode: 0o644, Data: []byte(nm), ModTime: next()})
	}
	add(&base, Entry{Name: "names/dir with\nnewline/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "names/dir with\nnewline/file with space", Type: tar.TypeReg, Mode: 0o644, Data: []byte("x\n"), ModTime: next()})
	add(&base, Entry{Name: "names/link with space", Type: tar.TypeSymlink, Mode: 0o777, Link: "with space", ModTime: next()})

	// A path near PATH_MAX and a symlink whose target is nearly as long.
	p := "pathmax/"
	add(&base, Entry{Name: p, Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	for i := 0; i < PathMaxDepth; i++ {
		p += fmt.Sprintf("%02d", i) + strings.Repeat("p", 198) + "/"
		add(&base, Entry{Name: p, Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	}
	add(&base, Entry{Name: p + strings.Repeat("f", PathMaxName), Type: tar.TypeReg, Mode: 0o644, Data: []byte("near PATH_MAX\n"), ModTime: next()})
	add(&base, Entry{Name: "pathmax/longlink", Type: tar.TypeSymlink, Mode: 0o777, Link: strings.Repeat("../", 1300) + "x", ModTime: next()})

	// Across layers: the upper layer whites out one name of a hardlink
	// group and a file with xattrs, makes a directory opaque with new
	// metadata, and replaces a file with a directory and a directory with
	// a file.
	add(&base, Entry{Name: "replace/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "replace/file-then-dir", Type: tar.TypeReg, Mode: 0o644, Data: []byte("file\n"), ModTime: next()})
	add(&base, Entry{Name: "replace/dir-then-file/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "replace/dir-then-file/child", Type: tar.TypeReg, Mode: 0o644, Data: []byte("child\n"), ModTime: next()})
	add(&base, Entry{Name: "replace/opaque/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "replace/opaque/lower", Type: tar.TypeReg, Mode: 0o4755, Data: []byte("hidden\n"), ModTime: next()})
	add(&base, Entry{Name: "replace/opaque/lowerdir/", Type: tar.TypeDir, Mode: 0o1777, ModTime: next()})

	// Overlay's own xattrs in a layer are not applied by containerd: they
	// must not make a directory opaque or a file a whiteout in a lazy mount.
	add(&base, Entry{Name: "forged/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "forged/opaque/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "forged/opaque/lower", Type: tar.TypeReg, Mode: 0o644, Data: []byte("still here\n"), ModTime: next()})
	add(&base, Entry{Name: "forged/xwhiteout/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&base, Entry{Name: "forged/xwhiteout/victim", Type: tar.TypeReg, Mode: 0o644, Data: []byte("lower victim\n"), ModTime: next()})
	add(&base, Entry{Name: "forged/xwhiteout/other", Type: tar.TypeReg, Mode: 0o644, Data: []byte("lower other\n"), ModTime: next()})
	add(&upper, Entry{Name: "forged/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&upper, Entry{Name: "forged/opaque/", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"trusted.overlay.opaque": "y"}, ModTime: next()})
	add(&upper, Entry{Name: "forged/opaque/upper", Type: tar.TypeReg, Mode: 0o644, Data: []byte("upper\n"), ModTime: next()})
	add(&upper, Entry{Name: "forged/xwhiteout/", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"trusted.overlay.opaque": "x"}, ModTime: next()})
	add(&upper, Entry{Name: "forged/xwhiteout/victim", Type: tar.TypeReg, Mode: 0o644, Data: []byte("upper victim\n"), Xattrs: map[string]string{"trusted.overlay.whiteout": "y"}, ModTime: next()})

	add(&upper, Entry{Name: "links/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&upper, Entry{Name: "links/b/", Type: tar.TypeDir, Mode: 0o711, ModTime: next()})
	add(&upper, Entry{Name: "links/b/.wh.group2", Type: tar.TypeReg, Mode: 0o644, ModTime: next()})
	add(&upper, Entry{Name: "xattrs/", Type: tar.TypeDir, Mode: 0o755, Xattrs: map[string]string{"user.dir": "changed above"}, ModTime: next()})
	add(&upper, Entry{Name: "xattrs/.wh.trusted", Type: tar.TypeReg, Mode: 0o644, ModTime: next()})
	add(&upper, Entry{Name: "replace/", Type: tar.TypeDir, Mode: 0o755, ModTime: next()})
	add(&upper, Entry{Name: "replace/file-then-dir/", Type: tar.TypeDir, Mode: 0o2750, GID: 100000, ModTime: next()})
	add(&upper, Entry{Name: "replace/file-then-dir/new", Type: tar.TypeReg, Mode: 0o644, Data: []byte("new\n"), ModTime: next()})
	add(&upper, Entry{Name: "replace/dir-then-file", Type: tar.TypeReg, Mode: 0o600, Data: []byte("now a file\n"), ModTime: next()})
	add(&upper, Entry{Name: "replace/opaque/", Type: tar.TypeDir, Mode: 0o3770, UID: 100000, GID: 65536, ModTime: next()})
	add(&upper, Entry{Name: "replace/opaque/.wh..wh..opq", Type: tar.TypeReg, Mode: 0o644, ModTime: next()})
	add(&upper, Entry{Name: "replace/opaque/lowerdir", Type: tar.TypeFifo, Mode: 0o600, ModTime: next()})
	return base, upper
}

// Large returns busybox plus one layer of about size bytes of random data
// spread over files files (named /large/fNNNN), and a few small files in
// /small for workloads that read little.
func Large(size int64, files int) (v1.Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return nil, err
	}
	if files < 1 {
		files = 1
	}
	per := int(size / int64(files))
	l := Layer{{Name: "large/", Type: tar.TypeDir, Mode: 0o755}, {Name: "small/", Type: tar.TypeDir, Mode: 0o755}}
	for i := 0; i < files; i++ {
		l = append(l, Entry{Name: "large/f" + pad4(i), Type: tar.TypeReg, Mode: 0o644, Data: Random(uint64(100+i), per)})
		if i%8 == 0 {
			l = append(l, Entry{Name: "small/s" + pad4(i), Type: tar.TypeReg, Mode: 0o644, Data: []byte("small file " + pad4(i) + "\n")})
		}
	}
	return Image(bb, l)
}

func pad4(i int) string { return fmt.Sprintf("%04d", i) }

// EStargz builds the layer as an eStargz blob with the reference builder,
// chunks of chunkSize bytes, and returns it with its TOC digest.
func (l Layer) EStargz(chunkSize int) ([]byte, digest.Digest, error) {
	t, err := l.Tar()
	if err != nil {
		return nil, "", err
	}
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(t), 0, int64(len(t))), estargz.WithChunkSize(chunkSize))
	if err != nil {
		return nil, "", err
	}
	defer b.Close()
	blob, err := io.ReadAll(b)
	if err != nil {
		return nil, "", err
	}
	return blob, b.TOCDigest(), nil
}
