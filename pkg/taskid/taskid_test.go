package taskid

import (
	"strings"
	"testing"
)

func TestRegistryBlobIsItsDigest(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	for _, u := range []string{
		"https://registry-1.docker.io/v2/library/python/blobs/" + d,
		"http://127.0.0.1:5000/v2/a/b/c/blobs/" + d + "?ns=docker.io",
		"http://mirror:4001/v2/library/python/blobs/" + d,
	} {
		id, err := ForURL(u, "", DefaultFilters)
		if err != nil || id != d {
			t.Errorf("%s -> %s %v", u, id, err)
		}
	}
}

func TestVolatileParametersIgnored(t *testing.T) {
	a, _ := ForURL("https://bucket.s3.amazonaws.com/obj?X-Amz-Signature=aaa&X-Amz-Date=1&version=2", "", DefaultFilters)
	b, _ := ForURL("https://bucket.s3.amazonaws.com/obj?version=2&X-Amz-Signature=bbb&X-Amz-Date=2", "", DefaultFilters)
	c, _ := ForURL("https://bucket.s3.amazonaws.com/obj?version=3", "", DefaultFilters)
	d, _ := ForURL("https://bucket.s3.amazonaws.com/obj?version=2", "other", DefaultFilters)
	if a != b {
		t.Fatal("signatures changed the task ID")
	}
	if a == c || a == d {
		t.Fatal("a real parameter or the tag did not change the task ID")
	}
	if len(a) != 64 {
		t.Fatalf("id %q", a)
	}
	if _, err := ForURL("/relative", "", nil); err == nil {
		t.Fatal("relative URL accepted")
	}
}
