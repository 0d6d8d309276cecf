#!/usr/bin/env bash
# Compile the app's plain-JVM module (bundle/) and run its JUnit tests with the JDK and
# Debian's jars (apt-get install default-jdk-headless junit4 libgoogle-gson-java), no Gradle
# or Android SDK needed. Usage: run_tests.sh BUNDLE_DIR [RUNTIMES] (a bundle from `edgelm export`;
# RUNTIMES such as EXECUTORCH=1.5.1,LITERT_LM=0.18.1,ORT_GENAI=0.18.0: the versions the app is built with).
set -euo pipefail
cd "$(dirname "$0")/bundle"
JARS=/usr/share/java
CP="$JARS/gson.jar:$JARS/junit4.jar:$JARS/hamcrest-core.jar"
for jar in gson.jar junit4.jar hamcrest-core.jar; do
    [ -f "$JARS/$jar" ] || { echo "missing $JARS/$jar: apt-get install junit4 libgoogle-gson-java"; exit 3; }
done
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
javac --release 11 -Xlint:all -Werror -d "$OUT/main" -cp "$CP" $(find src/main/java -name '*.java')
javac --release 11 -d "$OUT/test" -cp "$CP:$OUT/main" $(find src/test/java -name '*.java')
java -Dedgelm.bundle="${1:-}" -Dedgelm.runtimes="${2:-}" -cp "$CP:$OUT/main:$OUT/test" org.junit.runner.JUnitCore \
    dev.edgelm.bundle.ManifestTest dev.edgelm.bundle.RealManifestContractTest
