# A caller of puller's HTTP API written the way cyber-dojo's Ruby services call each
# other: Net::HTTP, a JSON body (always, "{}" for no arguments), GET for queries and POST
# for commands; the answer must be a JSON object holding a key named after the method,
# and an "exception" key is raised. The HTTP status is not looked at, as theirs do not.
#
#   ruby puller_client.rb http://127.0.0.1:5017 GET 'ready?' '{}'
#   ruby puller_client.rb http://127.0.0.1:5017 POST pull_images '{"id":"a1","image_name":"x"}'
#
# Prints the value under the method's key as JSON; on an error, prints the error to
# stderr and exits 1.
require 'json'
require 'net/http'
require 'uri'

class PullerError < StandardError; end

def call_puller(base, verb, name, args)
  uri = URI.parse("#{base}/#{name}")
  request = verb == 'GET' ? Net::HTTP::Get.new(uri) : Net::HTTP::Post.new(uri)
  request.content_type = 'application/json'
  request.body = JSON.generate(args)
  response = Net::HTTP.start(uri.host, uri.port) { |http| http.request(request) }
  begin
    json = JSON.parse(response.body)
  rescue JSON::ParserError
    raise PullerError, "http response.body is not JSON:#{response.body}"
  end
  raise PullerError, "http response.body is not JSON Hash:#{response.body}" unless json.is_a?(Hash)
  raise PullerError, JSON.pretty_generate(json['exception']) if json.key?('exception')
  raise PullerError, "http response.body has no key for '#{name}':#{response.body}" unless json.key?(name)
  json[name]
end

base, verb, name, args = ARGV
begin
  puts JSON.generate(call_puller(base, verb, name, JSON.parse(args || '{}')))
rescue PullerError => error
  warn error.message
  exit 1
end
