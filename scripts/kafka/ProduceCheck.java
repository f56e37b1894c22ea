// Produces a few records with Kafka's own Java client and reads them back, to check a listener of
// the test cluster (scripts/kafka-cluster) by hand. Run as a single-file program:
//
//   java -cp ".cache/kafka/<version>/libs/*" scripts/kafka/ProduceCheck.java BOOTSTRAP TOPIC [KEY=VALUE...]
//
// KEY=VALUE pairs are client properties, e.g. for the SASL_SSL listener:
//   security.protocol=SASL_SSL ssl.truststore.type=PEM ssl.truststore.location=<tls-dir>/ca.pem
//   sasl.mechanism=SCRAM-SHA-512
//   'sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="alice" password="alice-secret";'
// Prints "OK ..." and exits 0 on success; prints "FAILED <exception class>: <message>" and exits 1
// otherwise.
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class ProduceCheck {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: ProduceCheck BOOTSTRAP TOPIC [KEY=VALUE...]");
            System.exit(64);
        }
        Properties common = new Properties();
        common.put("bootstrap.servers", args[0]);
        for (int i = 2; i < args.length; i++) {
            int eq = args[i].indexOf('=');
            common.put(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        String topic = args[1];
        String marker = UUID.randomUUID().toString();
        int n = 5;
        try {
            Properties p = new Properties();
            p.putAll(common);
            p.put("acks", "all");
            p.put("max.block.ms", "20000");
            p.put("delivery.timeout.ms", "30000");
            p.put("request.timeout.ms", "10000");
            p.put("key.serializer", StringSerializer.class.getName());
            p.put("value.serializer", StringSerializer.class.getName());
            List<RecordMetadata> sent = new ArrayList<>();
            try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
                for (int i = 0; i < n; i++) {
                    sent.add(producer.send(new ProducerRecord<>(topic, "k" + i, marker + "-" + i)).get());
                }
            }
            RecordMetadata first = sent.get(0);
            Properties c = new Properties();
            c.putAll(common);
            c.put("group.id", "produce-check-" + marker);
            c.put("auto.offset.reset", "earliest");
            c.put("key.deserializer", StringDeserializer.class.getName());
            c.put("value.deserializer", StringDeserializer.class.getName());
            int seen = 0;
            try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(c)) {
                consumer.subscribe(List.of(topic));
                long deadline = System.currentTimeMillis() + 30000;
                while (seen < n && System.currentTimeMillis() < deadline) {
                    for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                        if (r.value().startsWith(marker)) seen++;
                    }
                }
            }
            if (seen < n) {
                System.out.println("FAILED produced " + n + " records but read back " + seen);
                System.exit(1);
            }
            System.out.println("OK produced and read back " + n + " records on " + topic
                    + " (partition " + first.partition() + ", offsets from " + first.offset() + ")");
        } catch (Exception e) {
            Throwable t = e;
            while (t.getCause() != null && t instanceof java.util.concurrent.ExecutionException) t = t.getCause();
            System.out.println("FAILED " + t.getClass().getName() + ": " + t.getMessage());
            System.exit(1);
        }
    }
}
