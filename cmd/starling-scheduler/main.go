// Command starling-scheduler coordinates the peers of a starling P2P network.
package main

import (
	"fmt"
	"os"

	"github.com/starling-dev/starling/internal/version"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "version") {
		fmt.Println("starling-scheduler", version.Version)
		return
	}
	fmt.Println("starling-scheduler", version.Version)
}
