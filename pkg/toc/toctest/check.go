package toctest

import (
	"errors"
	"fmt"

	digest "github.com/opencontainers/go-digest"

	"github.com/starling-dev/starling/pkg/toc"
)

func isInvalid(err error) bool { return errors.Is(err, toc.ErrInvalid) }
func isEscapes(err error) bool { return errors.Is(err, toc.ErrEscapes) }

// Check verifies the invariants every index must hold, whatever TOC it
// came from: a tree of unique sorted names reachable by Lookup, chunks that
// cover their files exactly and stay inside the payload and the limits,
// and Chunks() listing them in blob order. It walks without recursion.
func Check(ix *toc.Index, lim toc.Limits) error {
	if lim.MaxChunkSize <= 0 {
		lim.MaxChunkSize = toc.DefaultMaxChunkSize
	}
	span := lim.MaxSpan()
	if ix.Root == nil || ix.Root.Type != "dir" || ix.Root.Name != "" {
		return fmt.Errorf("bad root %+v", ix.Root)
	}
	if ix.TOCOffset < 0 || ix.TOCOffset > ix.BlobSize {
		return fmt.Errorf("TOC offset %d outside the %d byte blob", ix.TOCOffset, ix.BlobSize)
	}
	if ix.Landmark < -1 || ix.Landmark >= max(ix.TOCOffset, 0) && ix.Landmark != -1 {
		return fmt.Errorf("landmark %d outside the payload", ix.Landmark)
	}
	seen := map[*toc.Entry]bool{ix.Root: true}
	links := map[*toc.Entry]uint32{}
	var chunks int
	stack := []*toc.Entry{ix.Root}
	for len(stack) > 0 {
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		subdirs := uint32(0)
		for i, c := range d.Children() {
			if i > 0 && d.Children()[i-1].Name >= c.Name {
				return fmt.Errorf("%q: children not sorted or not unique at %q", d.Name, c.Name)
			}
			if c.Name == "" || c.Name == "." || c.Name == ".." || len(c.Name) > 255 {
				return fmt.Errorf("%q: bad child name %q", d.Name, c.Name)
			}
			full := c.Name
			if d.Name != "" {
				full = d.Name + "/" + c.Name
			}
			// Lookup walks from the root: checking it on every name
			// of a deep tree would cost depth squared.
			if c.Entry.Type != "dir" || len(full) < 256 {
				if e, ok := ix.Lookup(full); !ok || e != c.Entry {
					return fmt.Errorf("Lookup(%q) does not find its entry", full)
				}
			}
			if e, ok := d.Child(c.Name); !ok || e != c.Entry {
				return fmt.Errorf("Child(%q) does not find its entry", full)
			}
			e := c.Entry
			if e.Type == "dir" {
				subdirs++
				if seen[e] || e.Name != full {
					return fmt.Errorf("directory %q reached twice or named %q", full, e.Name)
				}
				seen[e] = true
				stack = append(stack, e)
				continue
			}
			links[e]++
			if links[e] > 1 {
				continue
			}
			if e.Children() != nil {
				return fmt.Errorf("%q: a %s with children", full, e.Type)
			}
			if err := checkFile(ix, e, lim.MaxChunkSize, span); err != nil {
				return fmt.Errorf("%q: %w", full, err)
			}
			chunks += len(e.Chunks)
		}
		if d.NumLink != 2+subdirs {
			return fmt.Errorf("directory %q: %d links, want %d", d.Name, d.NumLink, 2+subdirs)
		}
	}
	for e, n := range links {
		if e.NumLink != n {
			return fmt.Errorf("%q: %d links, but %d names", e.Name, e.NumLink, n)
		}
	}
	all := ix.Chunks()
	if len(all) != chunks {
		return fmt.Errorf("Chunks() lists %d chunks, files hold %d", len(all), chunks)
	}
	for i := 1; i < len(all); i++ {
		a, b := all[i-1], all[i]
		if a.Offset > b.Offset || a.Offset == b.Offset && a.Inner+a.Size > b.Inner {
			return fmt.Errorf("Chunks() out of order or overlapping at %d: %+v, %+v", i, a, b)
		}
	}
	return nil
}

func checkFile(ix *toc.Index, e *toc.Entry, maxChunk, span int64) error {
	if e.Type != "reg" {
		if len(e.Chunks) != 0 || e.Size != 0 {
			return fmt.Errorf("a %s with size %d and %d chunks", e.Type, e.Size, len(e.Chunks))
		}
		return nil
	}
	if e.Size < 0 {
		return fmt.Errorf("size %d", e.Size)
	}
	var off int64
	for i, c := range e.Chunks {
		switch {
		case c.FileOffset != off:
			return fmt.Errorf("chunk %d at file offset %d, want %d", i, c.FileOffset, off)
		case c.Size <= 0 || c.Size > maxChunk:
			return fmt.Errorf("chunk %d of size %d", i, c.Size)
		case c.Inner < 0 || c.Inner > maxChunk:
			return fmt.Errorf("chunk %d with inner offset %d", i, c.Inner)
		case c.Offset < 0 || c.End <= c.Offset || c.End > ix.TOCOffset:
			return fmt.Errorf("chunk %d at [%d, %d) outside the payload [0, %d)", i, c.Offset, c.End, ix.TOCOffset)
		case c.End-c.Offset > span:
			return fmt.Errorf("chunk %d spans %d bytes", i, c.End-c.Offset)
		}
		if _, err := digest.Parse(c.Digest); err != nil {
			return fmt.Errorf("chunk %d digest %q: %v", i, c.Digest, err)
		}
		if e.ChunkAt(c.FileOffset) != i || e.ChunkAt(c.FileOffset+c.Size-1) != i {
			return fmt.Errorf("ChunkAt does not find chunk %d", i)
		}
		off += c.Size
	}
	if off != e.Size {
		return fmt.Errorf("chunks cover %d of %d bytes", off, e.Size)
	}
	if e.ChunkAt(-1) != -1 || e.ChunkAt(e.Size) != -1 {
		return fmt.Errorf("ChunkAt finds a chunk outside the file")
	}
	return nil
}
